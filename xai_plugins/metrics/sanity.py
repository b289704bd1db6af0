"""Sanity checks for saliency maps (Adebayo et al. 2018; the review's section 7.1).

- Model parameter randomization: re-initialize the layers (modules with ``reset_parameters``,
  Quantus's granularity) from the top down, cumulatively ("cascading") or one at a time
  ("independent"), re-explain the same inputs with the same explainer after each layer, and
  measure the similarity of each randomized explanation to the original: one curve per
  similarity. An explainer that depends on the model gives dissimilar maps once the model is
  randomized; one that does not (an edge detector) stays similar.
- Data (label) randomization: train the same architecture from scratch on randomly permuted labels
  and compare its explanations with the original model's (small models only; can be switched off).

Similarities (``xai_plugins.similarity``): ``spearman`` (rank correlation of the maps, which are
absolute relevance for input-space methods: Adebayo's "with absolute value", Quantus's default
``abs=True``), ``spearman_signed`` (of the signed attributions summed over channels: "without
absolute value"), ``ssim``, ``pearson``, ``hog`` (Pearson correlation of HOG features).

Definitional notes versus Quantus ``MPRT``: same layer list and order, same re-initialization
(each layer's ``reset_parameters()`` right after ``torch.manual_seed(seed + 1)``), so the same
randomized models; the original explanation is the one already computed (Quantus explains the
batch twice more). The user's model is never touched: randomization happens on a private copy,
whose unchanged leading layers are served from one recorded forward (``PrefixCache``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xai_plugins import Explanation, Metric, MetricContext, hookimpl
from xai_plugins.metrics.plots import line_plot, map_grid
from xai_plugins.metrics.prefix_cache import PrefixCache
from xai_plugins.metrics.step_batch import StepBatch, nested
from xai_plugins.similarity import SIMILARITIES, SpearmanReference
from xai_plugins.toolkit import default_layer, explainer_flag, session, structural

_RESETS_EVERY_PARAMETER = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)
ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Explanation]
ORDERS = ("cascading", "independent")


# -- randomizing layers ----------------------------------------------------------------------------
def randomizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that can be re-initialized (they have ``reset_parameters``), in registration order:
    exactly the layers Quantus's ``get_random_layer_generator`` walks."""
    return [(n, m) for n, m in model.named_modules() if n and callable(getattr(m, "reset_parameters", None))]


def reinitialize(module: nn.Module, seed: int) -> None:
    """Re-draw ``module``'s parameters from its own initializer, seeded as Quantus does
    (``torch.manual_seed(seed + 1)``), without disturbing the caller's random state."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed + 1)
        module.reset_parameters()


@contextlib.contextmanager
def restored(modules: list[nn.Module]) -> Iterator[None]:
    """Give the parameters and buffers of ``modules`` back their exact values on exit."""
    saved = [(t, t.detach().clone()) for m in modules for t in list(m.parameters()) + list(m.buffers())]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)


def reinitialized_copy(module: nn.Module, seed: int) -> nn.Module:
    """A re-initialized copy of ``module`` (``reinitialize``), leaving ``module`` as it is. Layers
    whose ``reset_parameters`` redraws every parameter get fresh storage instead of a copy of
    values about to be overwritten (a VGG classifier holds hundreds of MB)."""
    fresh = isinstance(module, _RESETS_EVERY_PARAMETER)
    memo = {
        id(p): nn.Parameter(torch.empty_like(p) if fresh else p.detach().clone(), requires_grad=False)
        for p in module.parameters()
    }
    clone = copy.deepcopy(module, memo)
    reinitialize(clone, seed)
    return clone.eval()


def structural_copy(model: nn.Module) -> nn.Module:
    """New module objects over the very same parameter and buffer tensors: something to wrap and
    patch without touching the user's modules, at no memory cost. Never change its tensors."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def private_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy to randomize: the user's model object is never modified."""
    net = copy.deepcopy(model)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# -- the parameter randomization test --------------------------------------------------------------
@dataclass
class RandomizationCurve:
    """Similarity to the original explanation after each randomization step."""

    order: str
    layers: list[str]
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per layer: B values
    maps: list[torch.Tensor] = field(default_factory=list)  # per layer: the first maps (for the grid)
    seconds: float = 0.0
    reused_calls: int = 0  # module calls served by the prefix cache
    stacked_steps: int = 0  # steps explained in stacked batches
    stack_mismatch: str | None = None  # why stacking stopped early (None: it did not, or was not tried)

    def mean(self, name: str) -> list[float]:
        return [float(s.mean()) for s in self.scores[name]]


def scorer(name: str, reference: Explanation) -> Callable[[Explanation], torch.Tensor]:
    """One similarity to ``reference``, per image, as a function of the other explanation (see the
    module docstring); rank-based ones rank the reference once."""
    if name == "spearman_signed":
        signed = SpearmanReference(_signed(reference))
        return lambda exp: signed(_signed(exp))
    if name in ("spearman", "spearman_abs"):
        ranked = SpearmanReference(reference.maps, absolute=name == "spearman_abs")
        return lambda exp: ranked(exp.maps)
    if name not in SIMILARITIES:
        raise ValueError(f"unknown similarity {name!r}; known: spearman_signed, {', '.join(SIMILARITIES)}")
    return lambda exp: SIMILARITIES[name](reference.maps, exp.maps)


def similarity(name: str, a: Explanation, b: Explanation) -> torch.Tensor:
    """One similarity of two explanations of the same inputs, per image."""
    return scorer(name, a)(b)


def _signed(exp: Explanation) -> torch.Tensor:
    attr = exp.attributions.float()
    return attr.sum(dim=1) if attr.dim() == 4 else attr


def parameter_randomization(
    explain: ExplainFn,
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    original: Explanation | None = None,
    order: str = "cascading",
    layers: list[str] | None = None,
    seed: int = 42,
    similarities: tuple[str, ...] | list[str] = ("spearman",),
    cache: bool = True,
    keep_maps: int = 3,
    stack_rows: int = 0,
) -> RandomizationCurve:
    """Model parameter randomization test (Adebayo et al. 2018, section 3.1).

    ``explain(model, inputs, targets) -> Explanation`` re-runs the explainer under test (a metric
    context's ``explain``). ``layers``: dotted module names listed from input to output (default
    every randomizable module); they are randomized top down, the reverse of that list. ``model``
    never changes: stacked steps run on a ``structural_copy`` beside re-initialized copies of the
    layers, one-by-one steps on a ``private_copy``. ``stack_rows`` > 0: explain several steps in one batch of at most
    that many rows (``StepBatch``; the metric asks for it for ``Explainer.rowwise`` methods); the
    explainer is checked to follow the stacked rows (``_stacked_steps``), and where it does not, or
    with ``stack_rows`` 0, steps are explained one at a time, where ``cache`` serves
    the unchanged leading layers from a recorded forward (``PrefixCache``).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, not {order!r}")
    start = time.perf_counter()
    modules = dict(model.named_modules())
    names = [n for n, _ in randomizable_layers(model)] if layers is None else list(layers)
    unknown = [n for n in names if not callable(getattr(modules.get(n), "reset_parameters", None))]
    if unknown:
        raise ValueError(f"model has no layer {unknown[0]!r} that can be re-initialized (reset_parameters)")
    if not names:
        raise ValueError("the model has no layer to randomize (no module with reset_parameters)")
    names = names[::-1]
    if original is None:
        original = explain(model, inputs, targets)
    curve = RandomizationCurve(order, names, {s: [] for s in similarities})

    scorers = {s: scorer(s, original) for s in similarities}

    def record(exp: Explanation) -> None:
        for s, score in scorers.items():
            curve.scores[s].append(score(exp))
        curve.maps.append(exp.maps[:keep_maps].clone())

    if stack_rows // inputs.shape[0] >= 2 and len(names) >= 2:
        shell = structural_copy(model)
        shell_modules = dict(shell.named_modules())
        with session(shell, like=model):  # the shell's weights never change: one session
            # found now: once wrapped, the shell cannot run the one-row forward that finds it (a
            # model without one: the explainer that needs it reports that itself)
            with contextlib.suppress(Exception):
                default_layer(shell, inputs[:1])
            for exp in _stacked_steps(
                explain,
                shell,
                [shell_modules[n] for n in names],
                order,
                inputs,
                targets,
                seed,
                stack_rows // inputs.shape[0],
                original,
                curve,
            ):
                record(exp)
        curve.stacked_steps = len(curve.maps)
    done = len(curve.maps)
    if done < len(names):
        net = private_copy(model)
        net_modules = dict(net.named_modules())
        with session(net, like=model) as net_session:
            _steps_one_by_one(
                explain,
                net,
                [net_modules[n] for n in names],
                order,
                inputs,
                targets,
                seed,
                cache,
                done,
                record,
                curve,
                net_session.weights_changed,
            )
    curve.seconds = time.perf_counter() - start
    return curve


def _stacked_steps(
    explain: ExplainFn,
    net: nn.Module,
    modules: list[nn.Module],
    order: str,
    inputs: torch.Tensor,
    targets: torch.Tensor | None,
    seed: int,
    per_batch: int,
    original: Explanation,
    curve: RandomizationCurve,
) -> Iterator[Explanation]:
    """Each step's explanation, ``per_batch`` blocks of rows per explanation of a stacked batch;
    stops early (the caller goes on one step at a time; ``curve.stack_mismatch`` says why) when the
    explainer does not follow the stacked rows. The first batch starts with a control block, the
    original model, that must give ``original`` back: a check of the explainer, not of its flag."""
    if nested(modules):  # checked before drawing any re-initialized copy
        curve.stack_mismatch = "a randomized layer contains another one"
        return
    stack = StepBatch(net, {m: reinitialized_copy(m, seed) for m in modules}, inputs.shape[0])
    b, done, control = inputs.shape[0], 0, True
    try:
        while done < len(modules):
            steps = list(range(done, min(len(modules), done + per_batch - int(control))))
            blocks: list[int | None] = [None] * int(control) + steps  # None: the control block
            # step s re-initializes modules[:s + 1] (cascading) or modules[s] alone (independent)
            stack.plan(
                {
                    m: [s is not None and ((r <= s) if order == "cascading" else (r == s)) for s in blocks]
                    for r, m in enumerate(modules)
                }
            )
            xs = inputs.repeat(len(blocks), *([1] * (inputs.dim() - 1)))
            ts = None if targets is None else targets.repeat(len(blocks))
            try:
                exp = explain(net, xs, ts)
            except Exception:
                if stack.mismatch is None:
                    raise
                curve.stack_mismatch = stack.mismatch
                return
            curve.stack_mismatch = stack.unfollowed() or (
                _mixes_rows(_rows_of(exp, 0, b), original) if control else None
            )
            if curve.stack_mismatch:
                return
            for k, step in enumerate(blocks):
                if step is not None:
                    yield _rows_of(exp, k * b, (k + 1) * b)
            done, control = done + len(steps), False
    finally:
        stack.remove()


def _mixes_rows(control: Explanation, original: Explanation) -> str | None:
    """Why the control block's maps are not the original explanation's (None: they are, up to float
    rounding of kernels run on another number of rows)."""
    got, want = control.maps.float(), original.maps.float().to(control.maps.device)
    if got.shape != want.shape:
        return f"the stacked batch gave maps of shape {tuple(got.shape)}, not {tuple(want.shape)}"
    tolerance = 1e-3 * float(want.abs().amax()) + 1e-12
    if float((got - want).abs().amax()) > tolerance:
        return "the original model's rows in the stacked batch did not give the original explanation"
    return None


def _steps_one_by_one(
    explain: ExplainFn,
    net: nn.Module,
    modules: list[nn.Module],
    order: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    cache: bool,
    first: int,
    record: Callable[[Explanation], None],
    curve: RandomizationCurve,
    weights_changed: Callable[[], None],
) -> None:
    """Steps ``first`` onwards, each randomizing ``net`` in place (restored for ``independent``);
    ``weights_changed`` tells ``net``'s session after each change (``core.session``)."""
    prefix = PrefixCache(net, inputs) if cache else None
    changed: list[nn.Module] = []
    try:
        for step, module in enumerate(modules):
            with restored([module]) if order == "independent" else contextlib.nullcontext():
                if order == "cascading" or step >= first:
                    reinitialize(module, seed)
                    weights_changed()
                changed = changed + [module] if order == "cascading" else [module]
                if step < first:
                    continue
                if prefix is not None:
                    prefix.set_changed(changed)
                record(explain(net, inputs, targets))
            if order == "independent":
                weights_changed()  # restored
    finally:
        if prefix is not None:
            curve.reused_calls = prefix.stats["served"]
            prefix.remove()


def _rows_of(exp: Explanation, start: int, stop: int) -> Explanation:
    return Explanation(
        exp.method,
        exp.attributions[start:stop],
        exp.maps[start:stop],
        exp.targets[start:stop],
        {},
        dict(exp.params),
        exp.seconds,
    )


# -- the data (label) randomization test -----------------------------------------------------------
def train_on_permuted_labels(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """A frozen copy of ``model``'s architecture re-initialized and trained (core.train.train_model)
    on ``train_inputs`` (model-ready) with randomly permuted labels, and the accuracy it reached on
    those labels. The result depends on the architecture, data and settings only, not on the
    model's weights: it is kept in the model's session (``core.session``, structural), so every
    method of a run shares one training."""

    key = (
        tuple(train_inputs.shape),
        float(train_inputs.double().sum()),
        float(train_inputs.double().square().sum()),
        int(train_labels.sum()),
        epochs,
        lr,
        batch_size,
        seed,
    )
    return structural(
        model,
        ("sanity.retrained", key),
        lambda: _retrained(model, train_inputs, train_labels, epochs, lr, batch_size, seed),
    )


def _retrained(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[nn.Module, float]:
    from xai_plugins.toolkit import Preprocess, train_model

    net = copy.deepcopy(model)
    device = next(iter(net.parameters())).device
    g = torch.Generator().manual_seed(seed)
    permuted = train_labels[torch.randperm(train_labels.numel(), generator=g)]
    data = (train_inputs.to(device), permuted.to(device))
    identity = Preprocess(
        size=None,
        mean=[0.0] * train_inputs.shape[1],
        std=[1.0] * train_inputs.shape[1],
        channels=train_inputs.shape[1],
    )
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():  # train_model seeds the global RNG
        torch.manual_seed(seed)
        for _, m in randomizable_layers(net):
            m.reset_parameters()
        for p in net.parameters():
            p.requires_grad_(True)
        train_model(
            net, data, identity, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=False
        )
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(data[0]).argmax(1) == data[1]).float().mean())
    return net, accuracy


def label_randomization(
    explain: ExplainFn,
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    original: Explanation,
    similarities: tuple[str, ...] | list[str] = ("spearman",),
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], Explanation, float]:
    """Data randomization test (Adebayo et al. 2018, section 3.2): explain ``inputs`` with the model
    of ``train_on_permuted_labels``; returns the per-image similarities to ``original``, the new
    explanation, and the accuracy that model reached on the permuted training labels."""
    net, accuracy = train_on_permuted_labels(model, train_inputs, train_labels, epochs, lr, batch_size, seed)
    exp = explain(net, inputs, targets)
    return {s: similarity(s, original, exp) for s in similarities}, exp, accuracy


def infer_normalization(inputs: torch.Tensor, images: torch.Tensor) -> tuple[list[float], list[float]] | None:
    """Per-channel (mean, std) with inputs = (images - mean) / std, fitted on the run's model inputs
    and its [0, 1] display images; None when they are not related that way."""
    if images is None or images.shape != inputs.shape:
        return None
    x = inputs.detach().float().cpu().transpose(0, 1).reshape(inputs.shape[1], -1)
    y = images.detach().float().cpu().transpose(0, 1).reshape(inputs.shape[1], -1)
    means, stds = [], []
    for xc, yc in zip(x, y):
        keep = (yc > 1e-4) & (yc < 1 - 1e-4)  # clamped pixels do not follow the affine map
        xc, yc = (xc[keep], yc[keep]) if keep.sum() > 10 else (xc, yc)
        var = xc.var()
        if var <= 1e-12:
            return None
        std = float(((xc - xc.mean()) * (yc - yc.mean())).mean() / var)
        mean = float(yc.mean() - std * xc.mean())
        if std <= 0 or float((xc * std + mean - yc).abs().max()) > 1e-2:
            return None
        means.append(mean)
        stds.append(std)
    return means, stds


def training_data(context: MetricContext, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(model-ready inputs, labels) to retrain on: ``context.data`` ((inputs, labels) ready for the
    model, or a ShapesData / object with ``images`` in [0, 1] and ``labels``), else freshly generated
    `shapes`; [0, 1] images are normalized as the run's inputs are. A string says why there is none."""
    data = context.data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]).float(), torch.as_tensor(data[1]).long()
    results = context.results
    norm = infer_normalization(context.inputs, results.images) if results is not None else None
    if data is not None and hasattr(data, "images") and hasattr(data, "labels"):
        images, labels = data.images.float(), data.labels.long()
    else:
        b, c, h, w = context.inputs.shape
        if c != 3 or h != w or h < 16:
            return "no training data (context.data) and the inputs do not fit `shapes` images"
        from xai_plugins.toolkit import make_shapes

        shapes = make_shapes(samples, size=h, seed=seed)
        images, labels = shapes.images, shapes.labels
    if norm is None:
        return "cannot tell how the model's inputs are normalized (give context.data as (inputs, labels))"
    mean = torch.tensor(norm[0]).view(1, -1, 1, 1)
    std = torch.tensor(norm[1]).view(1, -1, 1, 1)
    return (images - mean) / std, labels


# -- the metric ------------------------------------------------------------------------------------
class Sanity(Metric):
    """Adebayo et al.'s sanity checks: cascading and independent model parameter randomization
    curves (``cascading.<similarity>`` per layer, ``cascading.<similarity>_full`` at full
    randomization, ``independent.<similarity>_max`` over layers) and label randomization
    (``label.<similarity>``). Lower similarity = the explanation depends on what the model learned.
    """

    name = "sanity"
    requires = ("explain",)
    higher_is_better = False
    params = {
        "cascading": True,
        "independent": True,
        "layers": None,
        "seed": 42,
        "similarities": ["spearman", "spearman_signed", "ssim", "hog"],
        "max_images": 32,
        "cache": True,
        "figures": True,
        "grid_images": 3,
        "label_randomization": True,
        "label_max_params": 1_000_000,
        "label_samples": 512,
        "label_epochs": 10,
        "label_lr": 3e-3,
        "stack_rows": 32,
    }

    def compute(self, context: MetricContext) -> dict[str, Any]:
        cfg = self.config
        n = min(int(cfg["max_images"]), context.inputs.shape[0])
        inputs, targets = context.inputs[:n], context.targets[:n]
        original = _subset(context.explanation, n)
        sims = list(cfg["similarities"])
        stack_rows = int(cfg["stack_rows"]) if explainer_flag(context.explanation.method, "rowwise") else 0
        out: dict[str, Any] = {}
        figures: dict[str, bytes] = {}
        images = context.results.images[:n] if context.results is not None else None
        for order in ORDERS:
            if not cfg[order]:
                continue
            curve = parameter_randomization(
                context.explain,
                context.model,
                inputs,
                targets,
                original,
                order,
                cfg["layers"],
                int(cfg["seed"]),
                sims,
                bool(cfg["cache"]),
                int(cfg["grid_images"]),
                stack_rows,
            )
            out.update(_curve_values(curve))
            if cfg["figures"]:
                figures.update(_curve_figures(curve, original, images, int(cfg["grid_images"])))
        if cfg["label_randomization"]:
            out.update(self._label(context, inputs, targets, original, sims, images, figures))
        if figures:
            out["_figures"] = figures
        return out

    def _label(self, context, inputs, targets, original, sims, images, figures) -> dict[str, Any]:
        cfg = self.config
        size = sum(p.numel() for p in context.model.parameters())
        if size > int(cfg["label_max_params"]):
            return {
                "label.skipped": f"model has {size} parameters (> label_max_params {cfg['label_max_params']})"
            }
        data = training_data(context, int(cfg["label_samples"]), int(cfg["seed"]))
        if isinstance(data, str):
            return {"label.skipped": data}
        start = time.perf_counter()
        scores, exp, acc = label_randomization(
            context.explain,
            context.model,
            data[0],
            data[1],
            inputs,
            targets,
            original,
            sims,
            int(cfg["label_epochs"]),
            float(cfg["label_lr"]),
            seed=int(cfg["seed"]),
        )
        out: dict[str, Any] = {f"label.{s}": float(v.mean()) for s, v in scores.items()}
        out["label.train_accuracy"] = acc
        out["label.seconds"] = time.perf_counter() - start
        if cfg["figures"]:
            k = int(cfg["grid_images"])
            figures["label_grid"] = map_grid(
                [("original", original.maps[:k]), ("random labels", exp.maps[:k])],
                images[:k] if images is not None else None,
                "explanations of a model trained on permuted labels",
            )
        return out


def _subset(exp: Explanation, n: int) -> Explanation:
    return _rows_of(exp, 0, n)


def _curve_values(curve: RandomizationCurve) -> dict[str, Any]:
    o = curve.order
    out: dict[str, Any] = {
        f"{o}.layers": list(curve.layers),
        f"{o}.seconds": curve.seconds,
        f"{o}.reused_calls": curve.reused_calls,
        f"{o}.stacked_steps": curve.stacked_steps,
    }
    if curve.stack_mismatch:
        out[f"{o}.stack_mismatch"] = curve.stack_mismatch
    for s in curve.scores:
        values = curve.mean(s)
        out[f"{o}.{s}"] = values
        out[f"{o}.{s}_mean"] = sum(values) / len(values)
        if o == "cascading":
            out[f"{o}.{s}_full"] = values[-1]
        else:
            out[f"{o}.{s}_max"] = max(values)
    return out


def _curve_figures(
    curve: RandomizationCurve, original: Explanation, images: torch.Tensor | None, k: int
) -> dict[str, bytes]:
    x = ["original", *curve.layers]
    series = {s: [1.0, *curve.mean(s)] for s in curve.scores}
    what = "top down, cumulative" if curve.order == "cascading" else "one layer at a time"
    figs = {
        f"{curve.order}_curve": line_plot(
            x,
            series,
            f"{original.method}: {curve.order} randomization ({what})",
            "similarity to original",
            "randomized layer",
            (-0.5, 1.05),
        )
    }
    columns = [("original", original.maps[:k])] + list(zip(curve.layers, curve.maps))
    figs[f"{curve.order}_grid"] = map_grid(
        columns,
        images[:k] if images is not None else None,
        f"{original.method}: maps after {curve.order} randomization",
    )
    return figs


@hookimpl
def xai_metrics():
    return [Sanity]
