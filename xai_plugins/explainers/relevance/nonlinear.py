"""LRP rules for the non-linear operations of transformers and modern CNNs (AttnLRP).

Achtibat et al., "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
ICML 2024. Each rule is a custom autograd function whose backward maps output relevance R to input
relevance (the relevance, not the gradient, flows backward here, as in ``lrp.py``):

- normalization (LayerNorm, RMSNorm, an unfolded BatchNorm): the identity rule on the
  normalization (Sec. 3.3.2): the standard deviation is a constant, which leaves a linear map
  z = L(x) (plus the affine bias b); its epsilon rule is R_x = x * L^T (R / stab(z + b)); with
  ``zero_bias`` the bias takes no share (R_x = x * L^T (R / stab(z)), conservative);
- softmax (Eq. 13 with its bias term): R_x = x * (R - s * sum(R)), masked (-inf) inputs get none;
  the rule is not conservative (its bias term absorbs sum(R) - sum(R_x)), which ``lrp`` reports;
- products of two activations: the uniform rule (Eq. 7 / Prop. 3.2): a bilinear product
  (q k^T, attention x values, a same-shaped elementwise gate) gives half of R to each factor,
  R_A = 1/2 A * (g B^T), R_B = 1/2 B * (A^T g), g = R / stab(A B);
- a gate that broadcasts over the other factor (squeeze-excitation: B x C x 1 x 1 times B x C x H x W)
  is a constant multiplier (the standard LRP treatment of gating): all relevance stays on the main
  branch; multiplying by a constant (layer scale, the attention scale) passes relevance;
- adding a constant (position embedding, relative position bias, a bias vector): the epsilon rule
  of a bias, R_x = x / stab(x + c) R; with ``zero_bias`` relevance passes.

GELU, SiLU, Hardswish, ReLU6 and the other element-wise activations take the identity rule (Eq. 9),
``canonizers.PassFn``; they are executed out of place (in-place forms included).
"""

from __future__ import annotations

import torch

from .rules import stabilize


class LinearizedFn(torch.autograd.Function):
    """``y = forward(x)``; backward R_x = x * lin.vjp(R / stab(den)), den = y or lin.z(x) (no bias).

    ``y`` is recomputed in the backward rather than saved: models add to a normalization's output
    in place (torchvision's ResNet ``out += identity`` after ``bn2``), which would make a saved
    output stale (an autograd in-place error when the residual sum is not canonized)."""

    @staticmethod
    def forward(ctx, x, forward, lin, eps, keep_bias):
        ctx.save_for_backward(x)
        ctx.forward, ctx.lin, ctx.eps, ctx.keep_bias = forward, lin, eps, keep_bias
        return forward(x)

    @staticmethod
    def backward(ctx, relevance):
        (x,) = ctx.saved_tensors
        den = ctx.forward(x) if ctx.keep_bias else ctx.lin.z(x)
        return x * ctx.lin.vjp(relevance / stabilize(den, ctx.eps)), None, None, None, None


class NormLinear:
    """The linear part of a normalization with the std held constant: z = w * (x - mean) / std over
    the last ``dims`` dimensions (``center=False``: RMSNorm, z = w * x / rms)."""

    def __init__(
        self,
        x: torch.Tensor,
        dims: int,
        weight: torch.Tensor | None,
        eps: float,
        center: bool,
        inv_std: torch.Tensor | None = None,
    ):
        self.axes = tuple(range(-dims, 0))
        self.center, self.weight = center, weight
        if inv_std is not None:  # from the normalization's own kernel
            self.inv_std = inv_std.detach()
            return
        with torch.no_grad():
            xd = x.detach()
            if center:
                var = xd.var(self.axes, unbiased=False, keepdim=True)
            else:
                var = xd.pow(2).mean(self.axes, keepdim=True)
            self.inv_std = torch.rsqrt(var + eps)

    def z(self, x: torch.Tensor) -> torch.Tensor:
        t = x - x.mean(self.axes, keepdim=True) if self.center else x
        t = t * self.inv_std
        return t * self.weight if self.weight is not None else t

    def vjp(self, g: torch.Tensor) -> torch.Tensor:
        u = g * self.weight if self.weight is not None else g
        u = u * self.inv_std
        return u - u.mean(self.axes, keepdim=True) if self.center else u


class ScaleLinear:
    """z = s * x (an unfolded batch norm's scale, per channel; -1 for ``c - x``)."""

    def __init__(self, scale: torch.Tensor | float):
        self.scale = scale

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale

    def vjp(self, g: torch.Tensor) -> torch.Tensor:
        return g * self.scale


class SoftmaxFn(torch.autograd.Function):
    """Softmax forward; AttnLRP's softmax rule backward: R_x = x * (R - s * sum(R)) (Eq. 13)."""

    @staticmethod
    def forward(ctx, x, dim, dtype, record):
        s = torch.softmax(x, dim, dtype=dtype)
        ctx.save_for_backward(x, s)
        ctx.dim, ctx.record = dim, record
        return s

    @staticmethod
    def backward(ctx, relevance):
        x, s = ctx.saved_tensors
        x = x.nan_to_num(0.0, 0.0, 0.0)  # masked (-inf) scores take no relevance
        r = relevance.to(s.dtype)
        out = (x * (r - s * r.sum(ctx.dim, keepdim=True))).to(x.dtype)
        if ctx.record is not None:  # the relevance the rule's bias term absorbs
            ctx.record(relevance - out)
        return out, None, None, None


class BilinearFn(torch.autograd.Function):
    """``op(a, b)`` bilinear (matmul or same-shaped product); the uniform rule backward: each factor
    takes half of the relevance, R_a = 1/2 a * (d op / d a)^T (R / stab(y)) (AttnLRP Eq. 7)."""

    @staticmethod
    def forward(ctx, a, b, op, eps):
        y = op(a, b)
        ctx.save_for_backward(a, b, y)
        ctx.op, ctx.eps = op, eps
        return y

    @staticmethod
    def backward(ctx, relevance):
        a, b, y = ctx.saved_tensors
        g = relevance / stabilize(y, ctx.eps)
        if ctx.op is torch.mul:
            return 0.5 * a * (g * b), 0.5 * b * (g * a), None, None
        if a.dim() >= 2 and a.shape[:-2] == b.shape[:-2] == g.shape[:-2]:
            ga, gb = g.matmul(b.transpose(-1, -2)), a.transpose(-1, -2).matmul(g)
        else:  # broadcast batch dimensions: let autograd reduce them
            with torch.enable_grad():
                pa, pb = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
                ga, gb = torch.autograd.grad(ctx.op(pa, pb), (pa, pb), g)
        return 0.5 * a * ga, 0.5 * b * gb, None, None


class GateFn(torch.autograd.Function):
    """``x * gate`` with the gate a constant multiplier: R_x = R, the gate (and its branch) gets none."""

    @staticmethod
    def forward(ctx, x, gate):
        return x * gate

    @staticmethod
    def backward(ctx, relevance):
        return relevance, None
