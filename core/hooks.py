"""Hook and patch helpers that always clean up: model preservation, layer capture, ReLU override.

Every method that hooks or patches a model goes through these context managers, so hooks are
removed and the model is restored even when the method raises (DESIGN.md: ``explain`` leaves the
model exactly as it found it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from core.session import Session, current_session

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)


def same_values(t: torch.Tensor, copy: torch.Tensor) -> bool:
    """Whether ``t`` holds exactly the values of the CPU ``copy`` (NaNs equal to NaNs). Reads the
    contents, so it sees writes through ``.data`` that ``tensor._version`` does not count."""
    if tuple(t.shape) != tuple(copy.shape) or t.dtype != copy.dtype:
        return False
    now = t.detach() if t.device.type == "cpu" else t.detach().cpu()
    if torch.equal(now, copy):
        return True
    return bool(
        now.is_floating_point()
        and torch.equal(now.isnan(), copy.isnan())
        and torch.equal(now.nan_to_num(0.0), copy.nan_to_num(0.0))
    )


def _snapshot(t: torch.Tensor, s: Session | None) -> torch.Tensor:
    """A CPU copy of ``t``'s values; in a session of the model (``s``, see ``core.session``) the
    copy of an earlier call, after its contents were compared with ``t``'s (a write through ``.data``
    keeps the version counter, not the values): cloning every parameter on every call cost as much
    as a forward pass on large models (VGG), comparing costs a read."""
    if s is not None:
        hit = s.snapshots.get(id(t))
        if hit is not None and hit[0] is t and same_values(t, hit[1]):
            return hit[1]
    copy = t.detach().to("cpu", copy=True)
    if s is not None:
        s.snapshots[id(t)] = (t, copy)
    return copy


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` back as the parameter or buffer ``name`` (dotted) of ``model``."""
    path, _, leaf = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    slot: dict[str, Any] = module._parameters if leaf in module._parameters else module._buffers
    slot[leaf] = tensor


class ModelState:
    """The parameters and buffers of ``model`` (the tensors and a copy of their values) at one
    moment; ``changed()`` compares contents, ``restore()`` puts back what a plugin changed
    (values written in place or through ``.data``, tensors replaced)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.tensors: dict[str, torch.Tensor] = dict(model.state_dict(keep_vars=True))
        s = current_session(model)
        self.values = {name: _snapshot(t, s) for name, t in self.tensors.items()}
        # True: the model was found unchanged after the last thing that ran on it (the engine sets
        # it after a clean plugin call and clears it before anything else runs on the model), so
        # ``preserved_model`` need not read every weight once more at its end
        self.checked = False

    def changed(self) -> list[str]:
        """Names of the parameters and buffers whose tensor or values differ from the snapshot."""
        now = self.model.state_dict(keep_vars=True)
        return [
            name
            for name, t in self.tensors.items()
            if now.get(name) is not t or not same_values(t, self.values[name])
        ]

    def restore(self) -> list[str]:
        """Restore every changed tensor; returns their names (empty: nothing had changed)."""
        names = self.changed()
        now = self.model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in names:
                t = self.tensors[name]
                if now.get(name) is not t:
                    _set_tensor(self.model, name, t)
                t.copy_(self.values[name])
        return names


@contextlib.contextmanager
def preserved_model(
    model: nn.Module,
    eval_mode: bool = True,
    freeze: bool = True,
    restore_values: bool = True,
    state: ModelState | None = None,
) -> Iterator[nn.Module]:
    """Run a block on ``model`` and give it back exactly as found.

    Restores: training flags of every module, ``requires_grad`` of every parameter, every
    module-level and global hook dict, and (``restore_values``) the parameters and buffers a
    method changed (compared by content, :class:`ModelState`; ``state``: one the caller took).
    """
    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [{name: dict(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)} for m in modules]
    import torch.nn.modules.module as module_mod

    global_hooks = {n: dict(getattr(module_mod, n)) for n in _GLOBAL_HOOKS if hasattr(module_mod, n)}
    params = list(model.named_parameters(remove_duplicate=False))
    requires = [p.requires_grad for _, p in params]
    if restore_values and state is None:
        state = ModelState(model)
    try:
        if eval_mode:
            model.eval()
        if freeze:
            for _, p in params:
                p.requires_grad_(False)
        yield model
    finally:
        for m, flag in zip(modules, training):
            m.training = flag
        for m, saved in zip(modules, hooks):
            for name, content in saved.items():
                current = getattr(m, name)
                current.clear()
                current.update(content)
        for n, content in global_hooks.items():
            current = getattr(module_mod, n)
            current.clear()
            current.update(content)
        for (_, p), flag in zip(params, requires):
            p.requires_grad_(flag)
        if restore_values and state is not None and not state.checked:
            state.restore()


class LayerCapture:
    """Forward hook that keeps a layer's output (last call wins, for reused modules).

    The hook hands a clone downstream so that an in-place operation after the layer (ResNet's
    ``relu(inplace=True)``) cannot overwrite the captured activation; gradients flow through the
    clone back to the captured tensor, so ``torch.autograd.grad(score, capture.output)`` works.
    """

    def __init__(
        self, module: nn.Module, clone: bool = True, track_grad: bool = True, contiguous: bool = False
    ):
        self.module, self.clone, self.track_grad = module, clone, track_grad
        # contiguous: hand on a contiguous clone, whatever the memory format of the layers before
        self.fmt = torch.contiguous_format if contiguous else torch.preserve_format
        self.output: torch.Tensor | None = None
        self.outputs: list[torch.Tensor] = []
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {type(module).__name__} returns {type(output).__name__}, not a tensor")
        if self.track_grad and not output.requires_grad and torch.is_grad_enabled():
            # nothing upstream needs grad (frozen parameters): start the graph here, so the
            # backward pass stops at this layer instead of reaching the input.
            output = output.detach().requires_grad_()
            self.output = output
            self.outputs.append(output)
            return output.clone(memory_format=self.fmt)
        self.output = output
        self.outputs.append(output)
        return output.clone(memory_format=self.fmt) if self.clone else None

    def __enter__(self) -> LayerCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


@contextlib.contextmanager
def capture_layers(
    modules: dict[str, nn.Module], contiguous: bool = False
) -> Iterator[dict[str, LayerCapture]]:
    """Capture several layers at once (``contiguous``: see ``LayerCapture``); all hooks removed on exit."""
    with contextlib.ExitStack() as stack:
        yield {
            name: stack.enter_context(LayerCapture(m, contiguous=contiguous)) for name, m in modules.items()
        }


_RELU_FUNCS = {F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_}


class _ReLUOverride(TorchFunctionMode):
    def __init__(self, replacement: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.replacement = replacement

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            return self.replacement(args[0] if args else kwargs["input"])
        if func is F.threshold and len(args) >= 3 and args[1] == 0 and args[2] == 0:
            return self.replacement(args[0])
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_override(replacement: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Route every ReLU of the forward pass through ``replacement``.

    Catches ``nn.ReLU`` modules (reused or in place), ``F.relu``/``F.relu_``, ``torch.relu`` and
    ``Tensor.relu`` inside ``forward``, using a ``TorchFunctionMode``: no model surgery, nothing to
    forget to undo. In-place ReLUs become out-of-place (callers use the returned tensor).
    ``replacement`` is usually a custom ``autograd.Function.apply`` defining a modified backward
    (guided backpropagation, deconvnet, DeepLIFT multipliers).
    """
    with _ReLUOverride(replacement):
        yield


ReLURule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A modified ReLU backward: ``rule(grad_output, relu_output) -> grad_input``."""


def guided_relu_rule(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al.): only positive gradients, only through units
    active in the forward pass (the review's Fig. 6d). ReLU's own backward kernel (zero where the
    output is not positive), then the positive part in place: two passes, one new tensor."""
    return torch.ops.aten.threshold_backward(grad, out, 0).clamp_(min=0)


def deconvnet_relu_rule(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """DeconvNet rectification (Zeiler & Fergus): ReLU of the backward signal, whatever the forward
    activation (the review's Fig. 6c)."""
    return grad.clamp(min=0)


class ReLUSwitch:
    """Which backward rule the ReLUs of a ``switchable_relu`` forward use; None: the true gradient."""

    def __init__(self) -> None:
        self.rule: ReLURule | None = None


class _SwitchableReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, switch: ReLUSwitch) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        ctx.switch = switch
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        rule = ctx.switch.rule
        if rule is None:
            return torch.ops.aten.threshold_backward(grad, out, 0), None
        return rule(grad, out), None


@contextlib.contextmanager
def switchable_relu() -> Iterator[ReLUSwitch]:
    """Run a forward pass whose ReLUs can be backpropagated through several rules.

    Every ReLU (modules, reused or in place, and functional calls, via ``relu_override``) records
    its output; set ``switch.rule`` before each ``torch.autograd.grad(..., retain_graph=True)`` to
    choose the backward (None: the true ReLU gradient; guided backpropagation, deconvnet, ...).
    One forward then serves the plain gradient and every modified-backward method.
    """
    switch = ReLUSwitch()
    with relu_override(lambda x: _SwitchableReLU.apply(x, switch)):
        yield switch
