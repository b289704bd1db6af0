"""Sanity checks (Adebayo et al.): randomization curves, their agreement with Quantus, stacked steps
against one step at a time, the gate on them, and the user's model left bit-identical."""

from __future__ import annotations

import copy

import edge_detector_plugin
import numpy as np
import pytest
import torch

from core.api import explain
from core.plugins import PluginHost
from core.policy import evaluate
from core.workflow import run
from xai_plugins import Explanation
from xai_plugins.metrics.sanity import parameter_randomization


@pytest.fixture(scope="module")
def host():
    """A plugin host with the built-ins and the insensitive test plugin registered."""
    h = PluginHost(load_entry_points=False)
    h.pm.register(edge_detector_plugin, name="test_insensitive_explainer")
    h._classes = None
    return h


def snapshot(model):
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = [
        (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    grads = [p.requires_grad for p in model.parameters()]
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    return state, flags, grads, forwards


def assert_unchanged(model, snap):
    state, flags, grads, forwards = snap
    now = model.state_dict(keep_vars=True)
    assert set(now) == set(state)
    for k, v in state.items():
        assert torch.equal(now[k].detach(), v), f"{k} changed"
    assert flags == [
        (m.training, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]
    assert grads == [p.requires_grad for p in model.parameters()]
    assert forwards == [m.__dict__.get("forward") for m in model.modules()]


def saliency_fn(model, x, t):
    return explain(model, x, t, method="saliency", progress=False)


def grad_cam_fn(model, x, t):
    return explain(model, x, t, method="grad_cam", progress=False)


def guided_fn(model, x, t):
    return explain(model, x, t, method="guided_backprop", progress=False)


def doubled_batch_fn(model, x, t):
    """Input gradients from one call of the model on the batch twice over (rows it made itself)."""
    xx = torch.cat([x, x]).requires_grad_(True)
    out = model(xx)
    (g,) = torch.autograd.grad(out.gather(1, torch.cat([t, t]).view(-1, 1)).sum(), xx)
    return Explanation("doubled", g[: x.shape[0]], g[: x.shape[0]].abs().amax(1), t, {}, {}, 0.0)


@pytest.mark.parametrize("fixture", ["residual_net", "functional_relu_cnn", "resnet18"])
@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_stacked_steps_give_the_one_by_one_curve(fixture, order, request, images32):
    """Several randomization steps explained in one batch (StepBatch) = one explanation per step,
    on reused in-place ReLUs + BatchNorm + residual adds, functional ReLUs, and torchvision's ResNet."""
    model = request.getfixturevalue(fixture)
    snap = snapshot(model)
    x = images32 if fixture != "resnet18" else images32[:1]
    t = torch.tensor([1, 0])[: x.shape[0]]
    for fn in (saliency_fn, grad_cam_fn, guided_fn) if fixture != "resnet18" else (saliency_fn,):
        original = fn(model, x, t)
        stacked = parameter_randomization(
            fn, model, x, t, original, order, similarities=("spearman",), stack_rows=3 * x.shape[0]
        )  # 3 steps a batch: a partial last batch
        plain = parameter_randomization(fn, model, x, t, original, order, similarities=("spearman",))
        assert stacked.stacked_steps == len(stacked.layers) and plain.stacked_steps == 0
        assert stacked.layers == plain.layers
        for a, b in zip(stacked.maps, plain.maps):
            assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(
            torch.stack(stacked.scores["spearman"]), torch.stack(plain.scores["spearman"]), atol=1e-4
        )
        assert_unchanged(model, snap)


def test_every_rowwise_explainer_keeps_its_promise(functional_relu_cnn, images32):
    """Each built-in explainer that declares ``rowwise`` (and so gets stacked randomization steps in
    the sanity metric) gives the one-by-one curve; CAM, which reads the linear layer's weights
    itself, must not declare it."""
    from core.plugins import explainer_flag, get_host

    rowwise = [m for m in get_host().names("explainer") if explainer_flag(m, "rowwise")]
    assert {"saliency", "grad_cam", "fem", "guided_backprop"} <= set(rowwise)
    assert "cam" not in rowwise and "score_cam" not in rowwise
    from test_transformers import tiny_torchvision_vit

    from core.errors import InputError

    x, t = images32[:1], torch.tensor([1])
    vit = tiny_torchvision_vit()
    for method in rowwise:

        def fn(m, xx, tt, method=method):
            return explain(m, xx, tt, method=method, progress=False)

        model, layers = functional_relu_cnn, None
        try:
            original = fn(model, x, t)
        except InputError as err:  # the attention methods refuse a CNN: held to their promise on a ViT
            assert "attention" in str(err), (method, err)
            # layers that do not nest (an attention module holds its out_proj), so the steps can stack
            model, layers = vit, ["heads.head", "encoder.layers.encoder_layer_1.mlp.3", "conv_proj"]
            original = fn(model, x, t)
        stacked = parameter_randomization(
            fn, model, x, t, original, layers=layers, similarities=("spearman",), stack_rows=4
        )
        plain = parameter_randomization(fn, model, x, t, original, layers=layers, similarities=("spearman",))
        # on the CNN every step stacks; the attention methods may fall back to one step at a time
        # (the stacked rows are checked, not trusted), and the curve must be the same either way
        assert stacked.stacked_steps == len(plain.maps) or model is vit, method
        for a, b in zip(stacked.maps, plain.maps):
            assert torch.allclose(a, b, atol=1e-5), method


def test_stacking_falls_back_for_an_explainer_with_batches_of_its_own(residual_net, images32):
    """An explainer that calls the model on rows it made itself: the stacked batch cannot follow
    it, so every step is explained one at a time, with the same curve."""
    x, t = images32[:1], torch.tensor([1])
    original = doubled_batch_fn(residual_net, x, t)
    snap = snapshot(residual_net)
    tried = parameter_randomization(
        doubled_batch_fn, residual_net, x, t, original, similarities=("spearman",), stack_rows=8
    )
    plain = parameter_randomization(
        doubled_batch_fn, residual_net, x, t, original, similarities=("spearman",)
    )
    assert tried.stacked_steps == 0 and len(tried.maps) == len(plain.maps) == 6
    for a, b in zip(tried.maps, plain.maps):
        assert torch.allclose(a, b, atol=1e-5)
    assert_unchanged(residual_net, snap)


def batch_centered_fn(model, x, t):
    """Saliency minus the batch's mean attribution: each row depends on the other rows."""
    exp = saliency_fn(model, x, t)
    attr = exp.attributions - exp.attributions.mean(0, keepdim=True)
    return Explanation("centered", attr, attr.abs().amax(1), exp.targets, {}, {}, 0.0)


def own_copy_fn(model, x, t):
    """Saliency of a copy rebuilt from the model's modules (as a folding explainer makes), not of
    the model it was given."""
    net = copy.deepcopy(model)
    for m in net.modules():
        m.__dict__.pop("forward", None)
    return saliency_fn(net, x, t)


@pytest.mark.parametrize("fn", [batch_centered_fn, own_copy_fn], ids=["mixes-rows", "own-copy"])
def test_stacking_checks_the_explainer_instead_of_trusting_it(fn, residual_net, images32):
    """An explainer that calls the model on exactly the rows given (so no StackMismatch), yet mixes
    rows or explains a model of its own: stacking finds that by itself (a control row of the
    original model, every re-initialized layer seen running) and goes one step at a time, giving
    the one-by-one curve; without the checks these curves would be wrong."""
    x, t = images32[:2], torch.tensor([1, 0])
    original = fn(residual_net, x, t)
    for order in ("cascading", "independent"):
        tried = parameter_randomization(
            fn, residual_net, x, t, original, order, similarities=("spearman",), stack_rows=8
        )
        plain = parameter_randomization(fn, residual_net, x, t, original, order, similarities=("spearman",))
        assert tried.stacked_steps == 0 and tried.stack_mismatch, (order, tried.stack_mismatch)
        assert len(tried.maps) == len(plain.maps) == len(tried.layers)
        for a, b in zip(tried.maps, plain.maps):
            assert torch.allclose(a, b, atol=1e-5)
    expected = "never called" if fn is own_copy_fn else "did not give the original explanation"
    assert expected in tried.stack_mismatch


def batch_max_fn(model, x, t):
    """Attribution magnitudes over the batch's largest: each row depends on the other rows."""
    exp = saliency_fn(model, x, t)
    raw = exp.attributions.abs().amax(1)
    return Explanation("batch_max", exp.attributions, raw / raw.amax(), exp.targets, {}, {}, 0.0)


def test_the_one_control_row_catches_a_batch_max_normalization(residual_net, images32):
    """The control is one row, the first image: here that image holds the original batch's largest
    attribution, so only the randomized rows change the stacked batch's largest (re-initialized
    layers give larger gradients), and the control row's map shows it."""
    x, t = images32[:2], torch.tensor([1, 0])
    raw = saliency_fn(residual_net, x, t).attributions.abs().flatten(1).amax(1)
    assert raw[0] == raw.max()  # the hard case for one row: it already holds the batch max
    original = batch_max_fn(residual_net, x, t)
    tried = parameter_randomization(batch_max_fn, residual_net, x, t, original, stack_rows=8)
    plain = parameter_randomization(batch_max_fn, residual_net, x, t, original)
    assert tried.stacked_steps == 0 and "did not give the original explanation" in tried.stack_mismatch
    for a, b in zip(tried.maps, plain.maps):
        assert torch.allclose(a, b, atol=1e-5)


def test_user_model_is_bit_identical_after_randomization_even_on_error(trained_cnn, shapes_probe):
    model = trained_cnn.model
    model.train()  # a model left in training mode by its user stays so
    model.classifier.register_forward_hook(lambda *a: None)
    snap = snapshot(model)
    x = trained_cnn.preprocess.normalize(shapes_probe.images[:4])
    t = torch.zeros(4, dtype=torch.long)
    try:
        for order in ("cascading", "independent"):
            for stack_rows in (0, 8):
                parameter_randomization(
                    saliency_fn,
                    model,
                    x,
                    t,
                    None,
                    order,
                    similarities=("spearman", "ssim"),
                    stack_rows=stack_rows,
                )
                assert_unchanged(model, snap)
        calls = []

        def failing(m, xx, tt):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("explainer broke mid-way")
            return saliency_fn(m, xx, tt)

        with pytest.raises(RuntimeError, match="mid-way"):
            parameter_randomization(failing, model, x, t, None, "independent")
        assert_unchanged(model, snap)
    finally:
        model._forward_hooks.clear()
        model.eval()


def test_mprt_agrees_with_quantus(trained_cnn, shapes_probe):
    import quantus

    model = trained_cnn.model
    x = trained_cnn.preprocess.normalize(shapes_probe.images[:6])
    t = model(x).argmax(1)

    def quantus_explain(model, inputs, targets, **kwargs):
        return saliency_fn(model, torch.as_tensor(inputs), torch.as_tensor(targets)).maps.unsqueeze(1).numpy()

    original = saliency_fn(model, x, t)
    for ours_order, their_order in (("cascading", "top_down"), ("independent", "independent")):
        ours = parameter_randomization(
            saliency_fn, model, x, t, original, ours_order, seed=42, similarities=("spearman",), stack_rows=12
        )  # 2 steps a batch
        assert ours.stacked_steps == 4
        metric = quantus.MPRT(layer_order=their_order, seed=42, disable_warnings=True)
        theirs = metric(
            model=model,
            x_batch=x.numpy(),
            y_batch=t.numpy(),
            a_batch=original.maps.unsqueeze(1).numpy(),
            explain_func=quantus_explain,
            device="cpu",
        )
        layers = [k for k in theirs if k != "original"]
        assert sorted(layers) == sorted(ours.layers) and len(layers) == 4
        if ours_order == "cascading":
            assert layers == ours.layers  # the same top-down order
        for layer, per_image in zip(ours.layers, ours.scores["spearman"]):
            assert np.allclose(theirs[layer], per_image.numpy(), atol=1e-4), layer


@pytest.fixture(scope="module")
def sanity_run(trained_cnn, shapes_probe, host, tmp_path_factory):
    probe = shapes_probe
    out = tmp_path_factory.mktemp("sanity")
    snap = snapshot(trained_cnn.model)
    results = run(
        trained_cnn.model,
        trained_cnn.preprocess.normalize(probe.images),
        ["saliency", "grad_cam", "edge_detector"],
        images=probe.images,
        labels=probe.labels,
        metrics=["sanity"],
        metric_params={
            "sanity": {
                "max_images": 64,
                "label_samples": 256,
                "label_epochs": 4,
                "similarities": ["spearman", "ssim"],
            }
        },
        reporters=["json"],
        out_dir=out,
        progress=False,
        host=host,
    )
    assert_unchanged(trained_cnn.model, snap)
    return results, out / "results.json"


def test_randomization_gate_passes_gradient_methods_and_fails_the_edge_detector(sanity_run):
    results, path = sanity_run
    assert not results.failures
    # thresholds halfway between the edge detector (1.0) and the gradient methods (about 0.25-0.4
    # on the reference CNN, varying with the CPU it was trained on): a margin both ways
    policy = {
        "checks": [
            {
                "name": "sensitive to cascading randomization",
                "method": "*",
                "metric": "sanity.cascading.spearman_full",
                "op": "<",
                "threshold": 0.7,
            },
            {
                "name": "sensitive to each layer",
                "method": "*",
                "metric": "sanity.independent.ssim_max",
                "op": "<",
                "threshold": 0.9,
            },
        ]
    }
    verdict = evaluate(policy, path)
    passed = {(c["method"], c["name"].split(" [")[0]): c["passed"] for c in verdict["checks"]}
    for method in ("saliency", "grad_cam"):
        assert passed[(method, "sensitive to cascading randomization")], verdict
        assert passed[(method, "sensitive to each layer")], verdict
    assert not passed[("edge_detector", "sensitive to cascading randomization")]
    assert not passed[("edge_detector", "sensitive to each layer")]
    assert verdict["status"] == "failed"
    edge = results.metrics["edge_detector"]
    assert edge["sanity.cascading.spearman"] == pytest.approx([1.0] * 4)
    for method in ("saliency", "grad_cam"):
        curve = results.metrics[method]["sanity.cascading.spearman"]
        assert curve[-1] < curve[0] or curve[0] < 0.9  # similarity falls as randomization goes deeper


def test_the_shipped_default_gate_refuses_the_edge_detector_on_its_sanity_checks(sanity_run):
    from pathlib import Path

    from core.policy import load_policy

    results, path = sanity_run
    policy = load_policy(Path(__file__).resolve().parent.parent / "policies" / "default.yaml")
    policy.checks[:] = [c for c in policy.checks if c.sanity]  # this run computed the sanity metric only
    assert len(policy.checks) == 3
    verdict = evaluate(policy, path)
    rows = {(c["method"], c["metric"]): c for c in verdict["checks"]}
    for metric in ("sanity.cascading.spearman_full", "sanity.independent.ssim_max", "sanity.label.spearman"):
        for method in ("saliency", "grad_cam"):
            assert rows[(method, metric)]["passed"], verdict
        assert not rows[("edge_detector", metric)]["passed"], verdict


def test_label_randomization_changes_model_dependent_explanations_only(sanity_run):
    results, _ = sanity_run
    for method in ("saliency", "grad_cam"):
        m = results.metrics[method]
        assert m["sanity.label.spearman"] < 0.75
        assert 0 < m["sanity.label.train_accuracy"] <= 1
    assert results.metrics["edge_detector"]["sanity.label.spearman"] == pytest.approx(1.0)


def test_sanity_figures_are_pngs(sanity_run):
    results, _ = sanity_run
    for kind in ("cascading_curve", "cascading_grid", "independent_curve", "independent_grid", "label_grid"):
        png = results.figures[f"sanity/grad_cam/{kind}"]
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_unknown_layer_and_order_are_errors(functional_relu_cnn, images32):
    t = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="no layer"):
        parameter_randomization(saliency_fn, functional_relu_cnn, images32, t, layers=["nope"])
    with pytest.raises(ValueError, match="order"):
        parameter_randomization(saliency_fn, functional_relu_cnn, images32, t, order="bottom_up")
