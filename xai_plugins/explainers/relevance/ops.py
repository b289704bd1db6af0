"""Shared operator tables and the linear-layer operator used by the LRP rules and DeepLIFT.

Both methods run the user's own ``forward`` under a ``TorchFunctionMode`` (no module hooks, no model
surgery) and recognize the operations that matter by the torch function being called:

- linear layers: ``F.conv1d/2d/3d`` and ``F.linear`` (whatever module, or plain functional code,
  calls them; a reused module is simply called twice);
- ``F.batch_norm`` (folded into the preceding linear layer when it directly consumes its output);
- ReLU in every spelling (``nn.ReLU`` reused or in place, ``F.relu``, ``torch.relu``,
  ``Tensor.relu``, their in-place forms) and the other element-wise activations;
- residual additions ``a + b`` / ``a += b`` / ``torch.add`` of two same-shaped activations;
- average and max pooling.

In-place forms are executed out of place and the result is returned, as ``core.hooks.relu_override``
does: ``forward`` code uses the returned tensor (``out = self.relu(out)``, ``out += identity``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

RELU_FUNCS = frozenset({F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_})
ACTIVATION_FUNCS = frozenset(
    {
        torch.sigmoid,
        torch.Tensor.sigmoid,
        torch.tanh,
        torch.Tensor.tanh,
        F.softplus,
        F.elu,
        F.leaky_relu,
        F.gelu,
        F.silu,
        F.relu6,
        F.hardtanh,
        F.hardswish,
        F.hardsigmoid,
        F.mish,
        torch.Tensor.sigmoid_,
        torch.Tensor.tanh_,
        torch.sigmoid_,
        torch.tanh_,
    }
)
# in-place element-wise activations, executed out of place (their forward must not overwrite a tensor
# that a rule saved for its backward pass)
_OUT_OF_PLACE = {
    torch.Tensor.sigmoid_: torch.sigmoid,
    torch.Tensor.tanh_: torch.tanh,
    torch.sigmoid_: torch.sigmoid,
    torch.tanh_: torch.tanh,
}
ADD_FUNCS = frozenset({torch.add, torch.Tensor.add, torch.Tensor.add_})
CONV_FUNCS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
MAXPOOL_FUNCS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
for _name, _nd in (
    ("_max_pool1d", 1),
    ("_max_pool2d", 2),
    ("_max_pool3d", 3),
    ("max_pool1d_with_indices", 1),
    ("max_pool2d_with_indices", 2),
    ("max_pool3d_with_indices", 3),
):
    if hasattr(F, _name):
        MAXPOOL_FUNCS[getattr(F, _name)] = _nd
AVGPOOL_FUNCS = frozenset(
    {
        F.avg_pool1d,
        F.avg_pool2d,
        F.avg_pool3d,
        F.adaptive_avg_pool1d,
        F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d,
    }
)


def is_relu_call(func: Any, args: tuple, kwargs: dict) -> bool:
    """ReLU in any spelling, including ``F.threshold(x, 0, 0)``."""
    if func in RELU_FUNCS:
        return True
    return func is F.threshold and len(args) >= 3 and args[1] == 0 and args[2] == 0


def first_arg(args: tuple, kwargs: dict, name: str = "input") -> torch.Tensor:
    return args[0] if args else kwargs[name]


_INPLACE_POSITION = {
    F.elu: 1,
    F.leaky_relu: 1,
    F.relu6: 0,
    F.hardtanh: 2,
    F.silu: 0,
    F.hardswish: 0,
    F.hardsigmoid: 0,
    F.mish: 0,
}


def activation_fn(func: Any, args: tuple, kwargs: dict):
    """``x -> func(x, *its other arguments)``, executed out of place (in-place flags dropped)."""
    if is_relu_call(func, args, kwargs):
        return torch.relu
    if func in _OUT_OF_PLACE:
        return _OUT_OF_PLACE[func]
    rest = tuple(args[1:])
    kw = {k: v for k, v in kwargs.items() if k not in ("input", "inplace")}
    if func in _INPLACE_POSITION:
        rest = rest[: _INPLACE_POSITION[func]]
        kw["inplace"] = False
    return lambda t: func(t, *rest, **kw)


def add_operands(func: Any, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two operands of a residual-style addition, or None for any other kind of add.

    Only an addition of two same-shaped floating tensors that are not parameters, without ``alpha``
    or ``out``, counts: ``x + bias``, ``x + 1`` or broadcasting adds are left to autograd.
    """
    if func not in ADD_FUNCS or "alpha" in kwargs or "out" in kwargs:
        return None
    if len(args) != 2 and not (len(args) == 1 and "other" in kwargs):
        return None
    a = args[0]
    b = args[1] if len(args) == 2 else kwargs["other"]
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if isinstance(a, torch.nn.Parameter) or isinstance(b, torch.nn.Parameter):
        return None
    if a.shape != b.shape or a.dim() < 2 or not a.is_floating_point() or not b.is_floating_point():
        return None
    return a, b


def _tuple(value: Any, n: int) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value) if len(value) == n else tuple(value) * n if len(value) == 1 else tuple(value)
    return (value,) * n


class LinearOp:
    """One call of ``F.linear`` or ``F.conv{1,2,3}d`` with its hyper-parameters, re-runnable with
    other inputs and parameters (the z of Eq. 12-15 with modified weights) and transposable
    (``vjp``: W^T g, the backward of the layer with respect to its input)."""

    def __init__(self, func: Any, args: tuple, kwargs: dict):
        self.func = func
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        self.weight: torch.Tensor = bound["weight"]
        self.bias: torch.Tensor | None = bound.get("bias")
        if func is F.linear:
            self.kind, self.nd = "linear", 0
            self.channel_dim = -1
            self.groups = 1
            return
        self.kind, self.nd = "conv", CONV_FUNCS[func]
        self.channel_dim = 1
        self.stride = _tuple(bound.get("stride", 1), self.nd)
        padding = bound.get("padding", 0)
        self.padding = padding if isinstance(padding, str) else _tuple(padding, self.nd)
        if self.padding == "valid":
            self.padding = (0,) * self.nd
        self.dilation = _tuple(bound.get("dilation", 1), self.nd)
        self.groups = int(bound.get("groups", 1))

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, weight, bias)
        return self.func(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def bias_view(self, bias: torch.Tensor, ndim: int) -> torch.Tensor:
        """``bias`` shaped to broadcast against an output of ``ndim`` dimensions."""
        if self.kind == "linear":
            return bias
        return bias.view(1, -1, *([1] * (ndim - 2)))

    def vjp(self, grad: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """W^T grad: the layer's backward with respect to its input (no weight gradient). ``like``:
        a tensor shaped like the layer's input (its values are not read)."""
        if self.kind == "linear":
            return grad.matmul(weight)
        if not grad.is_contiguous():
            grad = grad.contiguous()
        if isinstance(self.padding, str):  # padding="same": let autograd work out the padding
            with torch.enable_grad():
                probe = torch.zeros_like(like, requires_grad=True)
                out = self(probe, weight.detach(), None)
                return torch.autograd.grad(out, probe, grad)[0]
        if not like.is_contiguous():
            like = like.contiguous()
        return torch.ops.aten.convolution_backward(
            grad,
            like,
            weight,
            None,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            False,
            [0] * self.nd,
            self.groups,
            [True, False, False],
        )[0]

    def stacked_view(self, out: torch.Tensor, parts: int) -> torch.Tensor:
        """An output of ``parts`` weight stacks, viewed with the stack as its own dimension (after the
        batch dimension for convolutions, before the features for linear layers), so that a
        per-output tensor broadcasts against every part (``unsqueeze(stack_dim)``)."""
        if self.kind == "linear":
            return out.view(*out.shape[:-1], parts, out.shape[-1] // parts)
        return out.view(out.shape[0], parts, out.shape[1] // parts, *out.shape[2:])

    @property
    def stack_dim(self) -> int:
        return -2 if self.kind == "linear" else 1

    def split(self, out: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        return list(out.split(sizes, dim=self.channel_dim)) if len(sizes) > 1 else [out]

    def cat(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=self.channel_dim)


class ModuleTracker:
    """The dotted name of the innermost module of ``model`` running now (for one-line refusals that
    name the module): global forward pre/post hooks for the ``with`` block only, nothing on the model."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(m): (n or type(m).__name__) for n, m in model.named_modules()}
        self.stack: list[str] = []
        self._handles: list = []

    def __enter__(self) -> ModuleTracker:
        from torch.nn.modules import module as nn_module

        def pre(module, _args):
            self.stack.append(f"{self.names.get(id(module), '?')} ({type(module).__name__})")

        def post(module, _args, _out):
            if self.stack:
                self.stack.pop()

        self._handles = [
            nn_module.register_module_forward_pre_hook(pre),
            nn_module.register_module_forward_hook(post, always_call=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def current(self) -> str:
        return self.stack[-1] if self.stack else "the model's forward"
