"""DeConvolve's explainability loss (Eq. 1): its terms, its hygiene in a training loop, and its
effect on `shapes` against the same training without it; the succinct-learning ratio metric."""

from __future__ import annotations

import pytest
import torch

from core.explainability_loss import ExplainabilityLoss, dispersion, focus_stats, focus_terms
from xai_plugins import MetricContext
from xai_plugins.metrics.deconvolve_metrics import SuccinctLearning, succinct_ratio


def planted(k: int = 4, size: int = 8) -> torch.Tensor:
    """1 x k x size x size activations: filter 0 one pixel, filter 1 a 2x2 spot, filter 2 two
    opposite corners, filter 3 silent."""
    a = torch.zeros(1, k, size, size)
    a[0, 0, 2, 2] = 1.0
    a[0, 1, 4:6, 4:6] = 0.5
    a[0, 2, 0, 0] = a[0, 2, -1, -1] = 0.8
    return a


def test_hard_terms_on_planted_maps():
    a = planted()
    area, disp = focus_terms(a, None, threshold=0.1, temperature=None)
    assert float(area) == pytest.approx((1 + 4 + 2) / (4 * 64))
    mask = (a > 0).float()
    single = dispersion(mask[:, :1])
    assert float(single) == pytest.approx(0.0, abs=1e-5)
    corners = dispersion(mask[:, 2:3])
    assert float(corners) == pytest.approx((2 * (7 / 16) ** 2) ** 0.5 / (1 / 6) ** 0.5, rel=1e-4)
    uniform = dispersion(torch.ones(1, 1, 8, 8))
    assert 0.95 < float(uniform) <= 1.0
    # the layer value is the area-weighted mean over filters: (0*1 + spot*4 + corners*2) / 7
    spot = dispersion(mask[:, 1:2])
    assert float(disp) == pytest.approx(float((4 * spot + 2 * corners) / 7), rel=1e-5)
    # CAM weighting: a filter with a tiny weight falls below the black threshold
    grads = torch.ones(1, 4, 8, 8)
    grads[0, 2] = 0.01
    area_w, _ = focus_terms(a, grads, threshold=0.1, temperature=None)
    assert float(area_w) == pytest.approx(5 / 256)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_loss_is_differentiable_and_leaves_no_trace(residual_net, images32):
    model = residual_net.train()
    for p in model.parameters():
        p.requires_grad_(True)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    hooks = _hooks(model)
    loss_fn = ExplainabilityLoss(alpha=0.1, beta=0.05)
    labels = torch.tensor([0, 1])
    logits = model(images32)
    buffers_after_step = {k: v.clone() for k, v in model.named_buffers()}
    term = loss_fn(model, images32, labels, logits)
    assert term.dim() == 0 and term.item() > 0
    (torch.nn.functional.cross_entropy(logits, labels) + term).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert _hooks(model) == hooks and model.training
    # the extra forward does not count the batch in BatchNorm's running statistics a second time
    assert any(not torch.equal(buffers[k], v) for k, v in buffers_after_step.items())
    assert all(torch.equal(buffers_after_step[k], v) for k, v in model.named_buffers())
    # the surrogate follows the hard terms it stands in for
    hard = loss_fn.terms(model, images32, labels, hard=True)
    soft = loss_fn.terms(model, images32, labels)
    assert abs(soft.area.item() - hard.area.item()) < 0.05


def test_loss_terms_have_the_right_gradient_sign():
    """Lowering activations just above the black threshold lowers the area term."""
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = conv, torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))

    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 1, 1] = 1.0
    x[0, 0, 3:5, 3:5] = 0.12  # just above the 0.1 threshold relative to the peak
    loss_fn = ExplainabilityLoss(alpha=1.0, beta=0.0, layer="conv", cam_weighted=False)
    term = loss_fn(net, x, torch.tensor([0]))
    term.backward()
    assert float(conv.weight.grad.sum()) > 0  # descending the loss shrinks the weak region


def test_succinct_ratio_on_planted_layers():
    grads = torch.ones(1, 6, 8, 8)
    focused = torch.zeros(1, 6, 8, 8)
    focused[0, :, 2:4, 2:4] = 1.0  # every filter on the same spot, nothing else
    ratio, area = succinct_ratio(focused, grads)
    assert float(ratio) == 1.0 and float(area) == pytest.approx(4 / 64)
    hazy = focused.clone()
    hazy[0, 0, 4:, 4:] = 0.05  # less significant activation: below the black cut (0.1 of the peak)
    ratio, area = succinct_ratio(hazy, grads)
    assert float(ratio) == pytest.approx(24 / (24 + 16 * 0.05)) and float(area) == pytest.approx(4 / 64)
    lone = focused.clone()
    lone[0, 0, 7, 7] = 1.0  # a significant activation of one filter alone
    assert float(succinct_ratio(lone, grads, min_count=1)[0]) == 1.0
    assert float(succinct_ratio(lone, grads, min_count=2)[0]) == pytest.approx(24 / 25)
    # the default keeps the high-count step: a lone filter's position is not high-count
    assert float(succinct_ratio(lone, grads)[0]) == pytest.approx(24 / 25)
    # weighted by impact on the prediction: the haze of a filter with a large weight counts more
    heavy = grads.clone()
    heavy[0, 0] = 4.0
    r_heavy = float(succinct_ratio(hazy, heavy)[0])
    assert r_heavy < float(succinct_ratio(hazy, grads)[0])
    assert float(succinct_ratio(torch.zeros(1, 6, 8, 8), grads)[0]) == 1.0  # no activation at all


def test_explainability_loss_lowers_active_area_on_shapes():
    """Same seed, same data, same steps: with Eq. 1 the CAM-weighted feature maps are sparser and
    more concentrated, and more of their weight is significant (the succinct-learning ratio rises). A small budget (600 images, 3 epochs); the accuracy at full budget is
    measured separately (see the issue report): this budget does not train the CNN far enough to
    compare accuracies."""
    from core.datasets import make_shapes
    from core.models import build_model
    from core.preprocess import Preprocess
    from core.train import SHAPES_PREPROCESS, train_model

    pre = Preprocess(size=32, **SHAPES_PREPROCESS)
    train = make_shapes(600, size=32, seed=0)
    test = make_shapes(200, size=32, seed=10_000)
    x = pre.normalize(test.images)
    figures = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster than two fighting for the cores
    try:
        for name, extra in (("without", None), ("with", ExplainabilityLoss(alpha=0.1, beta=0.05))):
            torch.manual_seed(0)
            model = build_model("deconvolve_cnn", 4)
            train_model(model, train, pre, epochs=3, seed=0, extra_loss=extra, progress=False)
            stats = focus_stats(model, x, test.labels, layer="features")
            metric = SuccinctLearning(layers=["features"]).compute(MetricContext(model, x, test.labels))
            figures[name] = {
                **stats,
                "ratio": metric["features.ratio"],
                "metric_area": metric["features.active_area"],
            }
    finally:
        torch.set_num_threads(threads)
    print(figures)
    assert figures["with"]["area"] < 0.7 * figures["without"]["area"]
    assert figures["with"]["dispersion"] < figures["without"]["dispersion"]
    assert figures["with"]["ratio"] > figures["without"]["ratio"] + 0.03  # measured: 0.760 -> 0.857
    assert figures["with"]["metric_area"] == pytest.approx(figures["with"]["area"], rel=1e-4)


@pytest.mark.slow
def test_explainability_loss_keeps_accuracy_at_the_reference_budget(tmp_path):
    """The reference training of ``bench.succinct`` (3000 `shapes` images, 20 epochs, Adam 1e-3, batch
    16, seed 0: about 1.5 + 3 min on one core) with and without Eq. 1: held-out accuracy within 3
    points (measured: 99.75 % without, 99.5 % with), the active area of the CAM-weighted feature maps
    lower by a quarter or more (measured: 0.138 -> 0.086) and the succinct-learning ratio higher
    (measured: 0.656 -> 0.687). Not in ``make test``; ``make test-all`` runs it."""
    import json

    from bench.succinct import main

    threads = torch.get_num_threads()
    try:
        main(["--seeds", "0", "--json", str(tmp_path / "figures.json")])
    finally:
        torch.set_num_threads(threads)
    figures = json.loads((tmp_path / "figures.json").read_text())["seed 0"]
    assert figures["with"]["accuracy"] >= figures["without"]["accuracy"] - 0.03
    assert figures["with"]["area"] < 0.75 * figures["without"]["area"]
    assert figures["with"]["ratio"] > figures["without"]["ratio"]


def test_succinct_bench_runs_and_summarizes(tmp_path, capsys):
    """The bench's own plumbing at a token budget: both arms, every figure finite, a summary line each."""
    import json
    import math

    from bench.succinct import _FIGURES, main

    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "--seeds",
                    "3",
                    "--train",
                    "64",
                    "--epochs",
                    "1",
                    "--json",
                    str(tmp_path / "f.json"),
                    "--figure",
                    str(tmp_path / "t1.png"),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    figures = json.loads((tmp_path / "f.json").read_text())["seed 3"]
    assert set(figures) == {"without", "with"}
    for row in figures.values():
        assert all(math.isfinite(row[k]) for k in _FIGURES)
        assert 0 <= row["ratio"] <= 1 and row["ratio"] <= row["ratio_1"] + 1e-6  # min_count=2 keeps fewer
    out = capsys.readouterr().out
    assert all(f"  {k}" in out for k in _FIGURES) and "over 1 seed(s)" in out
    assert (tmp_path / "t1.png").stat().st_size > 0 and (tmp_path / "t1.md").read_text().strip()


def test_bench_succinct_writes_the_before_after_table(
    trained_cnn, clever_hans_cnn, shapes_probe, tmp_path, monkeypatch
):
    from bench.succinct import before_after

    monkeypatch.setenv("XAI_FIT_DIR", str(tmp_path / "fits"))
    pre = trained_cnn.preprocess
    x = pre.normalize(shapes_probe.images[:3])
    figure, texts = tmp_path / "table1.png", tmp_path / "table1.md"
    before_after(
        {"without loss": trained_cnn.model, "with loss": clever_hans_cnn.model},
        x,
        list(trained_cnn.class_names),
        str(figure),
        str(texts),
        mean=pre.mean,
        std=pre.std,
    )
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 5000
    lines = texts.read_text().splitlines()
    assert (
        len(lines) == 2 + 3 and "without loss description" in lines[0] and "with loss description" in lines[0]
    )
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6 and cells[1] in trained_cnn.class_names
        assert len(cells[3]) > 20 and len(cells[5]) > 20  # a sentence per model
