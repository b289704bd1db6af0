"""Explain several randomized versions of one model in one batch (the parameter randomization test).

Each step of the test is the model with some layers re-initialized. Instead of one explanation
per step, the inputs are repeated once per step (a block of ``B`` rows per step, after the one-row
control in the caller's first batch; ``plan`` takes each block's size) and every layer that some
step re-initializes runs its original parameters on the rows of the steps that keep them and a
re-initialized copy on the rows of the steps that randomize it. One explanation of the stacked
batch holds every step's explanation: the values one call per step gives (up to float rounding),
computed by kernels that work on one large batch instead of many small ones (on two CPU cores a
ResNet-18 input gradient costs about 1.5x less per image at 32 rows than at 2). Steps that have
not yet randomized anything below a layer feed it identical rows: a convolution or dense layer
then runs once on one block and is gathered into every step's rows and the control row
(``_SharedLinear``), each row still getting its own input gradient.

It is tried for explainers that say they explain each row from calls of the model on exactly the
rows given (``Explainer.rowwise``: gradient and Grad-CAM-family methods; not IG or Score-CAM, which
build batches of their own), and checked rather than trusted: a call of the model on another number
of rows, or a randomized layer that receives something other than the stacked rows, raises
``StackMismatch``; an explanation during which the model was never called, or a re-initialized layer
never ran (the explainer worked on a copy of its own), is reported by ``unfollowed()``; and the
caller's first stacked batch starts with a control row, the first image under the original model,
whose map must be the original explanation's first map (an explainer that mixes rows: batch-wide
normalization, noise drawn per batch). One row rather than the whole batch of ``B``: a statistic
over the batch reaches row 0 as it reaches every row, and the check costs one row of the stacked
batch instead of ``B`` (VGG-11, 11 steps, ``B`` = 2: 23 rows instead of 24). On any of these the
caller explains one step at a time instead. Nothing of the model changes: the re-initialized
copies live beside it and ``remove()`` unwraps every patched ``forward``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class StackMismatch(RuntimeError):
    """The explainer called the model in a way the stacked batch cannot follow."""


class StepBatch:
    """Wrap ``model`` (a private copy) so that one forward runs several randomization steps.

    ``randomized``: original module -> its re-initialized copy (no module of it may contain
    another). ``rows``: the images per step (a block's size unless ``plan`` says otherwise).
    ``plan(flags, sizes)`` sets, per module, which of the next explanation's blocks of rows use the
    copy, and how many rows each block has.
    """

    def __init__(self, model: nn.Module, randomized: dict[nn.Module, nn.Module], rows: int):
        if nested(list(randomized)):
            raise StackMismatch("a randomized layer contains another one")
        self.model, self.randomized, self.rows = model, randomized, rows
        self.flags: dict[nn.Module, list[bool]] = {}
        self.steps = 0  # blocks of rows in the next explanation
        self.sizes: list[int] = []  # rows per block
        self.offsets: list[int] = [0]  # first row of each block, then the total
        self.mismatch: str | None = None
        self._calls = 0  # stacked forwards of the model during this plan
        self._ran: set[nn.Module] = set()  # randomized modules that ran on the stacked rows
        self._active = False
        self._patched: list[nn.Module] = []
        self._patch(model, self._root_forward)
        for module, copy in randomized.items():
            self._patch(
                module, lambda original, module=module, copy=copy: self._layer_forward(original, copy, module)
            )

    def plan(self, flags: dict[nn.Module, list[bool]], sizes: list[int] | None = None) -> None:
        """Per randomized module, per block of rows of the next explanation: True = re-initialized.
        ``sizes``: the rows of each block (default ``rows`` each)."""
        lengths = {len(f) for f in flags.values()}
        if len(lengths) != 1:
            raise ValueError("every module needs one flag per block")
        steps = lengths.pop()
        sizes = [self.rows] * steps if sizes is None else list(sizes)
        if len(sizes) != steps or min(sizes, default=1) < 1:
            raise ValueError(f"need {steps} block sizes of at least one row, not {sizes}")
        self.flags, self.steps, self.sizes, self.mismatch = flags, steps, sizes, None
        self.offsets = [0, *itertools.accumulate(sizes)]
        self._calls, self._ran = 0, set()

    @property
    def total(self) -> int:
        """Rows of the stacked batch: the sum of the block sizes."""
        return self.offsets[-1]

    def unfollowed(self) -> str | None:
        """Why the explanation since ``plan`` cannot be the stacked steps' (None: it can): the
        model was never called, or a layer some step re-initializes never ran."""
        if self._calls == 0:
            return "the explainer never called the model it was given"
        idle = [m for m, f in self.flags.items() if any(f) and m not in self._ran]
        if idle:
            return f"a re-initialized {type(idle[0]).__name__} never ran on the stacked rows"
        return None

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    # -- wrapping --------------------------------------------------------------------------------
    def _patch(self, module: nn.Module, make: Callable[[Any], Callable[..., Any]]) -> None:
        forward = make(module.forward)
        module.forward = forward  # type: ignore[method-assign]
        self._patched.append(module)

    def _root_forward(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._active:  # the model calling itself: rows are already assigned
                return original(*args, **kwargs)
            n = _rows(args, kwargs)
            if n != self.total:
                self.mismatch = f"the model was called on {n} rows, not the {self.total} stacked ones"
                raise StackMismatch(self.mismatch)
            self._active = True
            self._calls += 1
            try:
                return original(*args, **kwargs)
            finally:
                self._active = False

        return forward

    def _layer_forward(
        self, original: Callable[..., Any], copy: nn.Module, module: nn.Module
    ) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            flags = self.flags[module]
            n = _rows(args, kwargs)
            if n != self.total:
                self.mismatch = f"layer received {n} rows, not {self.total}"
                raise StackMismatch(self.mismatch)
            self._ran.add(module)
            outputs = []
            for start, stop, randomized in _runs(flags):
                sl = slice(self.offsets[start], self.offsets[stop])
                a, kw = _slice(args, sl, n), {k: _slice((v,), sl, n)[0] for k, v in kwargs.items()}
                fn = copy if randomized else original
                linear = not (randomized or kw or len(a) != 1 or not isinstance(a[0], torch.Tensor))
                vjp = _input_vjp(module) if linear else None
                if vjp is None:
                    outputs.append(fn(*a, **kw))
                else:
                    outputs.append(_shared_linear(a[0], fn, vjp, self.sizes[start:stop]))
            return outputs[0] if len(outputs) == 1 else _concat(outputs)

        return forward


InputVJP = Callable[[torch.Tensor, torch.Size], torch.Tensor]
_CONV_INPUT_GRADS = {
    nn.Conv1d: torch.nn.grad.conv1d_input,
    nn.Conv2d: torch.nn.grad.conv2d_input,
    nn.Conv3d: torch.nn.grad.conv3d_input,
}


def nested(modules: list[nn.Module]) -> bool:
    """Whether one of ``modules`` contains another (such layers cannot be wrapped separately)."""
    inside = {sub for m in modules for sub in m.modules() if sub is not m}
    return any(m in inside for m in modules)


def _input_vjp(module: nn.Module) -> InputVJP | None:
    """For a layer linear in its input with frozen parameters (convolution with zero padding,
    dense): its input gradient, which does not depend on the input. None for anything else."""
    if any(p.requires_grad for p in module.parameters()):
        return None
    if isinstance(module, nn.Linear):
        return lambda g, shape: g @ module.weight
    conv_input = _CONV_INPUT_GRADS.get(type(module))
    if conv_input is None or module.padding_mode != "zeros" or isinstance(module.padding, str):
        return None
    return lambda g, shape: conv_input(
        shape, module.weight, g, module.stride, module.padding, module.dilation, module.groups
    )


class _SharedLinear(torch.autograd.Function):
    """A linear layer on rows that all copy rows of one source block: run on the source block once
    and gathered (``index``: the source row of every row). Steps whose layers so far are all
    original, and the control row (the first image), feed a layer such rows, so its forward runs
    once. The backward gives each row its own input gradient (the layer's transposed map applied to
    every row's output gradient; nothing is summed across steps, as a broadcast would)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        fn: Callable[[torch.Tensor], torch.Tensor],
        vjp: InputVJP,  # type: ignore[override]
        source: slice,
        index: torch.Tensor,
    ) -> torch.Tensor:
        ctx.vjp, ctx.shape = vjp, x.shape
        return fn(x[source]).index_select(0, index)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return ctx.vjp(g.contiguous(), ctx.shape), None, None, None, None


def _shared_linear(
    x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], vjp: InputVJP, sizes: list[int]
) -> torch.Tensor:
    """A linear layer on a run of unrandomized blocks of ``sizes`` rows: once on the source block
    and gathered where every block copies it (``_copied_rows``), else on every row."""
    found = _copied_rows(x, sizes)
    if found is None:
        return fn(x)
    source, index = found
    if torch.is_grad_enabled() and x.requires_grad:
        return _SharedLinear.apply(x, fn, vjp, source, index)
    return fn(x[source]).index_select(0, index)


def _copied_rows(x: Any, sizes: list[int]) -> tuple[slice, torch.Tensor] | None:
    """Where each block of ``sizes`` rows of ``x`` equals the first rows of one source block (the
    first of the largest size): that block's rows and the source row of every row of ``x``, built
    on ``x``'s device. One comparison per stretch of equal-size blocks (two at most: the control
    row, the steps), the source block not compared with itself, no temporary. None for fewer than
    two blocks, or a block that differs."""
    if len(sizes) < 2 or not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != sum(sizes):
        return None
    size = max(sizes)
    start = sum(sizes[: sizes.index(size)])
    source = x[start : start + size]
    at, index = 0, []
    for s, group in itertools.groupby(sizes):
        k = len(list(group))
        blocks = x[at : at + s * k].reshape(k, s, *x.shape[1:])
        if at == start:  # the source block leads its stretch: the others are compared with it
            blocks = blocks[1:]
        if len(blocks) and not torch.equal(blocks, source[:s].unsqueeze(0).expand_as(blocks)):
            return None
        index.append(torch.arange(s, device=x.device).repeat(k))
        at += s * k
    return slice(start, start + size), torch.cat(index)


def _runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal flags as (start, stop, flag)."""
    runs, start = [], 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            runs.append((start, i, flags[start]))
            start = i
    return runs


def _rows(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _slice(values: tuple, sl: slice, n: int) -> tuple:
    return tuple(
        v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v for v in values
    )


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in first):
        return type(first)(torch.cat(parts) for parts in zip(*outputs))
    raise StackMismatch(f"a randomized layer returned {type(first).__name__}, not tensors")
