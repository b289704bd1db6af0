"""Canonization for LRP on real networks, done on the fly instead of by rewriting the model.

Zennit canonizes by mutating the model (merging BatchNorm parameters into the convolution,
replacing ResNet blocks' ``forward`` with one that routes the residual addition through a ``Sum``
module) and undoing it afterwards. Here the model is never touched: the forward runs under a
``TorchFunctionMode`` (``lrp.py``) and these helpers give the canonical form to the operations as
they happen:

- BatchNorm folding: when ``F.batch_norm`` (eval statistics) directly consumes the output of a
  convolution or linear layer, the layer's rule is evaluated with the folded parameters
  W' = W * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta, and the batch
  norm passes relevance through unchanged (Zennit ``SequentialMergeBatchNorm`` + ``Pass``). The pairing
  is found from the data flow (the batch norm's input *is* the layer's output tensor), not from
  the order modules were registered in. Folded parameters are kept in the model's session
  (``xai_plugins.toolkit.derived``: for one run, or a ``with session(model)`` block), never in a
  module-level cache.
- Residual additions ``a + b`` / ``out += identity`` of two activations get their own relevance
  split in proportion to the contributions, R_a = a / (a + b) R (Zennit ``Norm`` on its ``Sum``
  layer; the review's Eq. 12 applied to an addition).
- Average pooling: the same proportional split (Zennit ``Norm`` on ``AvgPool``).
- ReLU (any spelling, reused modules, in place) and other activations, and unfolded batch norms,
  pass relevance through (Zennit ``Pass``): the activation's output relevance becomes its input's.

Max pooling keeps its gradient (relevance goes to the maximum, as in Zennit).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from xai_plugins.toolkit import derived

from .rules import stabilize


def model_cache(model: torch.nn.Module) -> dict:
    """LRP's objects derived from ``model``'s weights (folded parameters, prepared rules), kept in
    the model's session; without one, a fresh dict (the objects last one call)."""
    return derived(model, "lrp", dict)


def cached(cache: dict, key: Any, anchors: tuple, compute: Callable[[], Any]) -> Any:
    """``compute()`` kept under ``key`` while it is asked for with the same ``anchors`` (the very
    tensors it is computed from, compared by identity and held by the entry, so that their ids are
    not reused meanwhile; other hashable settings compared by equality)."""
    hit = cache.get(key)
    if hit is not None and len(hit[0]) == len(anchors) and all(_same(a, b) for a, b in zip(hit[0], anchors)):
        return hit[1]
    value = compute()
    cache[key] = (anchors, value)
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return a == b


def batch_norm_args(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    bound.setdefault("weight", None)
    bound.setdefault("bias", None)
    bound.setdefault("training", False)
    bound.setdefault("eps", 1e-5)
    return bound


def can_fold(bn: dict[str, Any]) -> bool:
    """Eval-mode batch norm with running statistics (what a canonized model contains)."""
    return not bn["training"] and bn.get("running_mean") is not None and bn.get("running_var") is not None


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Parameters of ``batch_norm(L(x; W, b))`` as one layer ``L(x; W', b')``."""
    with torch.no_grad():
        weight = weight.detach()
        scale = torch.rsqrt(bn["running_var"].detach() + bn["eps"])
        if bn["weight"] is not None:
            scale = scale * bn["weight"].detach()
        shift = -bn["running_mean"].detach() * scale
        if bias is not None:
            shift = shift + bias.detach() * scale
        if bn["bias"] is not None:
            shift = shift + bn["bias"].detach()
        folded = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        return folded.to(weight.dtype), shift.to(weight.dtype)


def folded_parameters(
    cache: dict, weight: torch.Tensor, bias: torch.Tensor | None, bn: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = (weight, bias, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"])
    return cached(
        cache,
        ("fold", id(weight), id(bn["running_var"])),
        (*tensors, bn["eps"]),
        lambda: fold_batch_norm(weight, bias, bn),
    )


class PassFn(torch.autograd.Function):
    """``fn(x)`` forward; relevance passed through unchanged backward (Zennit ``Pass``)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None


class SumFn(torch.autograd.Function):
    """Residual addition ``a + b`` with relevance split R_a = a / stab(a + b) R (Zennit ``Norm``)."""

    @staticmethod
    def forward(ctx, a, b, eps):
        ctx.save_for_backward(a, b)
        ctx.eps = eps
        return a + b

    @staticmethod
    def backward(ctx, relevance):
        a, b = ctx.saved_tensors
        s = relevance / stabilize(a + b, ctx.eps)
        return a * s, b * s, None


class NormFn(torch.autograd.Function):
    """A parameter-free linear map (average pooling) with the proportional split
    R_in = x * P^T (R / stab(P x)) (Zennit ``Norm``; Eq. 12 with the pooling weights)."""

    @staticmethod
    def forward(ctx, x, fn, eps):
        y = fn(x)
        ctx.save_for_backward(x, y)
        ctx.fn, ctx.eps = fn, eps
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, y = ctx.saved_tensors
        s = relevance / stabilize(y, ctx.eps)
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            back = torch.autograd.grad(ctx.fn(probe), probe, s)[0]
        return x * back, None, None
