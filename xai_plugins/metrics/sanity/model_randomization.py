"""The model parameter randomization test (Adebayo et al. 2018, section 3.1): cascading or
independent re-initialization, top down, one similarity curve per similarity. Steps run stacked
(``stacking.StepBatch``, the one speed-up, checked against a one-row control: the first image under
the original model) or, for an explainer that does not follow the stacked rows, one at a time on a
private copy."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from xai_plugins import Explanation
from xai_plugins.metrics.sanity.randomize import (
    private_copy,
    randomizable_layers,
    reinitialize,
    reinitialized_copy,
    restored,
    structural_copy,
)
from xai_plugins.metrics.sanity.stacking import StepBatch, nested
from xai_plugins.similarity import SIMILARITIES, SpearmanReference
from xai_plugins.toolkit import default_layer, session

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], Explanation]
ORDERS = ("cascading", "independent")


@dataclass
class RandomizationCurve:
    """Similarity to the original explanation after each randomization step."""

    order: str
    layers: list[str]
    scores: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # name -> per layer: B values
    maps: list[torch.Tensor] = field(default_factory=list)  # per layer: the first maps (for the grid)
    seconds: float = 0.0
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
    with ``stack_rows`` 0, steps are explained one at a time.
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
        # the shell's weights (the model's own tensors) never change: one session, whose
        # snapshots of them are the model's session's
        with session(shell, like=model, same_tensors=True):
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
                done,
                record,
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
    """Each step's explanation, from stacked batches of at most ``per_batch`` (>= 2) blocks of
    ``B`` rows; stops early (the caller goes on one step at a time; ``curve.stack_mismatch`` says
    why) when the explainer does not follow the stacked rows. The first batch starts with a control
    row, the first image under the original model, whose map must be ``original``'s first: a check
    of the explainer, not of its flag, that costs one row rather than a block of ``B``."""
    if nested(modules):  # checked before drawing any re-initialized copy
        curve.stack_mismatch = "a randomized layer contains another one"
        return
    stack = StepBatch(net, {m: reinitialized_copy(m, seed) for m in modules}, inputs.shape[0])
    b, done, lead = inputs.shape[0], 0, 1  # lead: rows before the step blocks (the control)
    try:
        while done < len(modules):
            fit = max(1, (per_batch * b - lead) // b)  # step blocks within the row budget
            steps = list(range(done, min(len(modules), done + fit)))
            stack.plan(_step_flags(modules, order, [None] * lead + steps), [1] * lead + [b] * len(steps))
            xs = _stacked(inputs, lead, len(steps))
            try:
                exp = explain(net, xs, None if targets is None else _stacked(targets, lead, len(steps)))
            except Exception:
                if stack.mismatch is None:
                    raise
                curve.stack_mismatch = stack.mismatch
                return
            curve.stack_mismatch = stack.unfollowed() or (
                _mixes_rows(_rows_of(exp, 0, lead), _rows_of(original, 0, lead)) if lead else None
            )
            if curve.stack_mismatch:
                return
            for k in range(len(steps)):
                yield _rows_of(exp, lead + k * b, lead + (k + 1) * b)
            done, lead = done + len(steps), 0
    finally:
        stack.remove()


def _step_flags(
    modules: list[nn.Module], order: str, blocks: list[int | None]
) -> dict[nn.Module, list[bool]]:
    """Per module, per block: re-initialized? Step ``s`` re-initializes ``modules[:s + 1]``
    (cascading) or ``modules[s]`` alone (independent); ``None``, the control, nothing."""
    return {
        m: [s is not None and ((r <= s) if order == "cascading" else (r == s)) for s in blocks]
        for r, m in enumerate(modules)
    }


def _stacked(t: torch.Tensor, lead: int, blocks: int) -> torch.Tensor:
    """``t``'s first ``lead`` rows (the control), then all of ``t`` once per step block (one copy)."""
    return torch.cat([t[:lead], *([t] * blocks)])


def _mixes_rows(control: Explanation, original: Explanation) -> str | None:
    """Why the control row's map is not the original explanation's first (both given as their
    rows; None: it is, up to float rounding of kernels run on another number of rows)."""
    got, want = control.maps.float(), original.maps.float().to(control.maps.device)
    if got.shape != want.shape:
        return f"the stacked batch gave maps of shape {tuple(got.shape)}, not {tuple(want.shape)}"
    tolerance = 1e-3 * float(want.abs().amax()) + 1e-12
    if float((got - want).abs().amax()) > tolerance:
        return "the original model's row in the stacked batch did not give the original explanation"
    return None


def _steps_one_by_one(
    explain: ExplainFn,
    net: nn.Module,
    modules: list[nn.Module],
    order: str,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    first: int,
    record: Callable[[Explanation], None],
    weights_changed: Callable[[], None],
) -> None:
    """Steps ``first`` onwards, each randomizing ``net`` in place (restored for ``independent``);
    ``weights_changed`` tells ``net``'s session after each change (``core.session``)."""
    for step, module in enumerate(modules):
        with restored([module]) if order == "independent" else contextlib.nullcontext():
            if order == "cascading" or step >= first:
                reinitialize(module, seed)
                weights_changed()
            if step < first:
                continue
            record(explain(net, inputs, targets))
        if order == "independent":
            weights_changed()  # restored


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
