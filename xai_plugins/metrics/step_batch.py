"""Explain several randomized versions of one model in one batch (the parameter randomization test).

Each step of the test is the model with some layers re-initialized. Instead of one explanation
per step, the inputs are repeated once per step (rows ``k*B:(k+1)*B`` belong to step ``k``) and
every layer that some step re-initializes runs its original parameters on the rows of the steps
that keep them and a re-initialized copy on the rows of the steps that randomize it. One
explanation of the stacked batch holds every step's explanation: the values one call per step
gives (up to float rounding), computed by kernels that work on one large batch instead of many
small ones (on two CPU cores a ResNet-18 input gradient costs about 1.5x less per image at 32 rows
than at 2).

Only for explainers that explain each row from calls of the model on exactly the rows given
(``Explainer.rowwise``: gradient and CAM methods, not IG or Score-CAM, which build batches of
their own). A call of the model on another number of rows, or a randomized layer that receives
something other than the stacked rows, raises ``StackMismatch``; the caller then explains one step
at a time instead. Nothing of the model changes: the re-initialized copies live beside it and
``remove()`` unwraps every patched ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class StackMismatch(RuntimeError):
    """The explainer called the model in a way the stacked batch cannot follow."""


class StepBatch:
    """Wrap ``model`` (a private copy) so that one forward runs several randomization steps.

    ``randomized``: original module -> its re-initialized copy (no module of it may contain
    another). ``rows``: the images per step. ``plan(steps)`` sets, per module, which of the next
    explanation's steps use the copy.
    """

    def __init__(self, model: nn.Module, randomized: dict[nn.Module, nn.Module], rows: int):
        subtrees = {m: set(m.modules()) - {m} for m in randomized}
        if any(other in subtrees[m] for m in randomized for other in randomized):
            raise StackMismatch("a randomized layer contains another one")
        self.model, self.randomized, self.rows = model, randomized, rows
        self.flags: dict[nn.Module, list[bool]] = {}
        self.steps = 0
        self.mismatch: str | None = None
        self._active = False
        self._patched: list[nn.Module] = []
        self._patch(model, self._root_forward)
        for module, copy in randomized.items():
            self._patch(module, lambda original, module=module, copy=copy: self._layer_forward(original, copy, module))

    def plan(self, flags: dict[nn.Module, list[bool]]) -> None:
        """Per randomized module, per step of the next explanation: True = re-initialized."""
        lengths = {len(f) for f in flags.values()}
        if len(lengths) != 1:
            raise ValueError("every module needs one flag per step")
        self.flags, self.steps, self.mismatch = flags, lengths.pop(), None

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
            if n != self.steps * self.rows:
                self.mismatch = f"the model was called on {n} rows, not {self.steps} steps x {self.rows}"
                raise StackMismatch(self.mismatch)
            self._active = True
            try:
                return original(*args, **kwargs)
            finally:
                self._active = False
        return forward

    def _layer_forward(self, original: Callable[..., Any], copy: nn.Module, module: nn.Module) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if not self._active:
                return original(*args, **kwargs)
            flags = self.flags.get(module, [False] * self.steps)
            n = _rows(args, kwargs)
            if n != self.steps * self.rows:
                self.mismatch = f"layer received {n} rows, not {self.steps * self.rows}"
                raise StackMismatch(self.mismatch)
            outputs = []
            for start, stop, randomized in _runs(flags):
                sl = slice(start * self.rows, stop * self.rows)
                a, kw = _slice(args, sl, n), {k: _slice((v,), sl, n)[0] for k, v in kwargs.items()}
                outputs.append((copy if randomized else original)(*a, **kw))
            return _concat(outputs)
        return forward


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
    return tuple(v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v for v in values)


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in first):
        return type(first)(torch.cat(parts) for parts in zip(*outputs))
    raise StackMismatch(f"a randomized layer returned {type(first).__name__}, not tensors")
