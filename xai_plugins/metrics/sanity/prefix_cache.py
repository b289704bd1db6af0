"""Reuse the forward work of a model's unchanged leading layers across many re-explanations.

The parameter randomization test re-explains the same inputs once per randomized layer. Layers
that run before the first randomized one see the same inputs with the same parameters, so their
outputs are those of the original model: ``PrefixCache`` records them once (one forward whose
autograd graph is kept) and serves them in every later forward instead of recomputing them.

How it stays correct for any explainer and any architecture (functional ReLUs, residual adds,
reused in-place modules): every submodule of a *private copy* of the model has its ``forward``
wrapped. During a forward on inputs equal to (a slice of) the reference inputs, module calls are
matched one by one against the recorded call sequence; a call is served from the record only while

- no module with changed parameters has been entered yet in this forward (causality: nothing
  computed so far depends on a changed layer),
- the module's subtree holds no changed module and no hook (an explainer's hooks must see the
  live computation), and its parameters are the ones recorded (version counters),
- no ``TorchFunctionMode`` (ReLU overrides of modified-backward methods) and no global module hook
  is active.

Served outputs carry the gradient of the recorded forward: they are outputs of one autograd node
of the input (``_ReplayHub``) whose backward pulls all their incoming gradients through the kept
graph to the input in a single backward pass, so the input gradient is the one a live forward
would give. Anything else runs live, unchanged. Only forward work is saved: the input-gradient
backward through the unchanged layers still runs once per re-explanation (each randomized model
sends a different gradient through them).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.modules.module as _module_mod
from torch import nn
from torch.autograd.function import once_differentiable

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class _StopRecording(Exception):
    """Raised inside the recording forward when it reaches a changed module."""


@dataclass
class _Call:
    module: nn.Module
    end: int | None = None  # index after the call's last nested call (None: never finished)
    slot: int | None = None  # index of the output in the record's outputs (None: not a tensor)
    versions: tuple[int, ...] = ()


@dataclass
class _Record:
    ref_x: torch.Tensor  # the leaf the recorded graph starts from
    calls: list[_Call] = field(default_factory=list)
    stopped_by: nn.Module | None = None  # the changed module that ended the recording
    outputs: list[torch.Tensor] = field(default_factory=list)  # graph-connected, by output slot


class _ReplayHub(torch.autograd.Function):
    """All recorded outputs as one autograd node of the input: its backward pulls the gradients of
    every served output through the recorded graph in a single backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, record: _Record) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.record = record
        ctx.set_materialize_grads(False)
        return tuple(out.detach() for out in record.outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):  # type: ignore[override]
        record = ctx.record
        pairs = [(out, g) for out, g in zip(record.outputs, grads) if g is not None and out.requires_grad]
        if not pairs:
            return torch.zeros_like(record.ref_x), None
        outs, gs = zip(*pairs)
        (g,) = torch.autograd.grad(outs, record.ref_x, gs, retain_graph=True, allow_unused=True)
        return (g if g is not None else torch.zeros_like(record.ref_x)), None


@dataclass
class _Session:
    record: _Record
    x: torch.Tensor
    recording: bool = False
    serving: bool = True
    pos: int = 0
    hub: tuple[torch.Tensor, ...] | None = None


class PrefixCache:
    """Serve the outputs of unchanged leading module calls of ``model`` (a private copy that this
    object may patch) for inputs equal to slices of ``reference``.

    Tell it which modules currently differ from the original with ``set_changed``; ``stats``
    counts served and live module calls.
    """

    def __init__(self, model: nn.Module, reference: torch.Tensor):
        self.model = model
        self.reference = reference.detach()
        self.changed: set[nn.Module] = set()
        self.stats = {"served": 0, "live": 0, "records": 0}
        self._records: dict[tuple[int, int], _Record] = {}
        self._session: _Session | None = None
        self._subtree = {m: list(m.modules()) for m in model.modules()}
        self._originals: dict[nn.Module, Any] = {}
        for module in model.modules():
            self._wrap(module, root=module is model)

    # -- public ----------------------------------------------------------------------------------
    def set_changed(self, modules: set[nn.Module] | list[nn.Module]) -> None:
        """The modules whose parameters (or their descendants') now differ from the original."""
        changed: set[nn.Module] = set()
        for m in modules:
            changed.update(self._subtree.get(m, [m]))
        self.changed = changed

    def remove(self) -> None:
        """Unwrap every module (the copy behaves exactly as before)."""
        for module in self._originals:
            module.__dict__.pop("forward", None)
        self._originals.clear()
        self._records.clear()

    # -- wrapping --------------------------------------------------------------------------------
    def _wrap(self, module: nn.Module, root: bool) -> None:
        original = module.forward
        self._originals[module] = original
        if root:

            def forward(*args: Any, **kwargs: Any) -> Any:
                return self._root_forward(original, args, kwargs)
        else:

            def forward(*args: Any, **kwargs: Any) -> Any:
                return self._module_forward(module, original, args, kwargs)

        module.forward = forward  # type: ignore[method-assign]

    def _root_forward(self, original: Any, args: tuple, kwargs: dict) -> Any:
        if self._session is not None or kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return original(*args, **kwargs)
        x = args[0]
        key = self._match(x)
        if key is None or _function_mode_active() or _global_hooks():
            return original(x)
        record = self._records.get(key)
        if record is None or not self._sufficient(record):
            record = self._record(original, x)
            self._records[key] = record
        self._session = _Session(record, x)
        try:
            return original(x)
        finally:
            self._session = None

    def _module_forward(self, module: nn.Module, original: Any, args: tuple, kwargs: dict) -> Any:
        s = self._session
        if s is None:
            return original(*args, **kwargs)
        if s.recording:
            return self._record_call(s.record, module, original, args, kwargs)
        if not s.serving:
            return original(*args, **kwargs)
        calls = s.record.calls
        if (
            module in self.changed
            or _hooked(module)
            or s.pos >= len(calls)
            or calls[s.pos].module is not module
        ):
            s.serving = False
            self.stats["live"] += 1
            return original(*args, **kwargs)
        call = calls[s.pos]
        if call.end is None or call.slot is None or not self._servable(module, call):
            s.pos += 1  # run it live; its children may still be served
            return original(*args, **kwargs)
        s.pos = call.end
        self.stats["served"] += 1
        if s.hub is None:
            s.hub = _ReplayHub.apply(s.x, s.record)
        return s.hub[call.slot].clone()

    # -- recording -------------------------------------------------------------------------------
    def _record(self, original: Any, x: torch.Tensor) -> _Record:
        """One forward of ``x`` without any hook, keeping module outputs up to the first changed
        module (and the graph from a fresh input leaf to them)."""
        record = _Record(ref_x=x.detach().clone().requires_grad_(True))
        self._session = _Session(record, x, recording=True)
        try:
            with _without_hooks(self.model), torch.enable_grad():
                original(record.ref_x)
        except _StopRecording:
            pass
        finally:
            self._session = None
        self.stats["records"] += 1
        return record

    def _record_call(
        self, record: _Record, module: nn.Module, original: Any, args: tuple, kwargs: dict
    ) -> Any:
        if module in self.changed:
            record.stopped_by = module
            raise _StopRecording
        call = _Call(module, versions=_versions(module))
        record.calls.append(call)
        out = original(*args, **kwargs)
        call.end = len(record.calls)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            call.slot = len(record.outputs)
            record.outputs.append(out.clone())  # a later in-place op must not change what we keep
        return out

    def _sufficient(self, record: _Record) -> bool:
        """True when the record reaches the first currently changed module (or is complete)."""
        if not self.changed or record.stopped_by is None or record.stopped_by in self.changed:
            return True
        return any(c.module in self.changed for c in record.calls)

    # -- checks ----------------------------------------------------------------------------------
    def _servable(self, module: nn.Module, call: _Call) -> bool:
        subtree = self._subtree.get(module, [module])
        if any(m in self.changed or _hooked(m) for m in subtree):
            return False
        return _versions(module) == call.versions

    def _match(self, x: torch.Tensor) -> tuple[int, int] | None:
        ref = self.reference
        n = x.shape[0]
        if (
            x.dim() != ref.dim()
            or x.shape[1:] != ref.shape[1:]
            or n == 0
            or n > ref.shape[0]
            or x.dtype != ref.dtype
            or x.device != ref.device
        ):
            return None
        for start in range(0, ref.shape[0] - n + 1):
            if torch.equal(ref[start], x[0]) and torch.equal(ref[start : start + n], x):
                return start, n
        return None


def _hooked(module: nn.Module) -> bool:
    return any(len(getattr(module, name, ())) for name in _HOOK_DICTS)


def _function_mode_active() -> bool:
    """A TorchFunctionMode (e.g. a ReLU override) changes what a forward computes: no serving.
    Unknown (a torch without this private check): assume one is active."""
    check = getattr(torch._C, "_is_torch_function_mode_enabled", None)
    return True if check is None else bool(check())


def _global_hooks() -> bool:
    return any(len(getattr(_module_mod, name, ())) for name in _GLOBAL_HOOKS)


def _versions(module: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in itertools.chain(module.parameters(), module.buffers()))


@contextlib.contextmanager
def _without_hooks(model: nn.Module) -> Iterator[None]:
    """Detach every module hook dict for the duration (restored as the very same objects)."""
    saved = []
    for m in model.modules():
        for name in _HOOK_DICTS:
            if hasattr(m, name):
                saved.append((m, name, getattr(m, name)))
                setattr(m, name, type(getattr(m, name))())
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)
