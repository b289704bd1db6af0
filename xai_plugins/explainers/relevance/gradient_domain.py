"""LRP in the gradient domain: the same rules as ``lrp.py`` where each is a modified gradient.

Where every linear layer takes LRP-epsilon with a vanishing epsilon and its bias in the denominator
(AttnLRP as Achtibat et al., ICML 2024, run it on transformers: the ``attn_lrp`` composite, which
asks for this domain), relevance at any tensor t is R_t = t * g_t for a gradient-like g,
and each rule becomes a rule for g (LXT's "efficient" implementation computes exactly this):

- linear layers, residual and constant additions, average pooling, token means, max pooling,
  constant scaling: the epsilon / proportional rules R_x = x * J^T (R / z) equal the plain gradient
  (R / z = g), so autograd runs them natively;
- the softmax rule (AttnLRP Eq. 13), R_x = x * (R - s * sum(R)) with R = s * g, is the softmax's own
  gradient, s * (g - sum(s * g)); its bias term, sum(R_s) - sum(R_x), is reported;
- the identity rule on element-wise activations (Eq. 9), R_x = R_y, is g_x = g * y / x;
- the identity rule on normalizations (Sec. 3.3.2) is the gradient with the std held constant;
- the uniform rule on a product of two activations (Eq. 7) halves the gradient to each factor; on
  fused attention softmax(q k^T) v that is 1/4 to q and k and 1/2 to v around the fused kernel
  (``attention.fused_sdpa``), the softmax rule's bias term then measured as 1/2 R_out - R_q - R_k;
- a squeeze-excitation gate is a constant factor: the gradient with the gate detached.

The input relevance is x * g. Compared with carrying relevance explicitly (each linear layer
dividing by its stabilized output and multiplying by its input), this saves two element-wise passes
per layer and the stabilizer; ``lrp`` chooses it where the two agree (``lrp.gradient_domain_applies``),
and ``tests/test_relevance_modern.py`` checks that they do.
"""

from __future__ import annotations

import torch

from .nonlinear import NormLinear, SoftmaxFn


class IdentityRuleFn(torch.autograd.Function):
    """``fn(x)`` (element-wise) forward; backward g_x = g * y / x: R_x = x g_x = R_y (Eq. 9)."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        # y / x as a reciprocal and a product (out-of-place division: 21 ms on 4.8 M floats here,
        # this 4.5 ms); where x = 0 the ratio is 0, as the relevance rule's y / stab(0) = 0 for f(0) = 0
        ctx.save_for_backward(torch.reciprocal(x).mul_(y).nan_to_num_(0.0, 0.0, 0.0))
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class ScaleGradFn(torch.autograd.Function):
    """Identity forward; backward the gradient times ``factor`` (1/2: one factor of a product under
    the uniform rule; 1: a layer's input), recording the relevance x * g' when ``record`` is given."""

    @staticmethod
    def forward(ctx, x, factor, record):
        if record is not None:
            ctx.save_for_backward(x)
        ctx.factor, ctx.record = factor, record
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.factor if ctx.factor != 1.0 else grad
        if ctx.record is not None:
            (x,) = ctx.saved_tensors
            ctx.record(x * grad)
        return grad, None, None


def half(x: torch.Tensor) -> torch.Tensor:
    """``x`` as one factor of a product of two activations (the uniform rule, AttnLRP Eq. 7)."""
    return ScaleGradFn.apply(x, 0.5, None)


class NormGradFn(torch.autograd.Function):
    """A normalization: ``forward(x)`` gives its output and its linear part with the std held
    constant (``nonlinear.NormLinear``); backward that part's gradient (``lin.vjp``), the identity
    rule of Sec. 3.3.2."""

    @staticmethod
    def forward(ctx, x, forward):
        y, ctx.lin = forward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        return ctx.lin.vjp(grad), None


def layer_norm(x: torch.Tensor, shape: list[int], weight, bias, eps: float) -> torch.Tensor:
    """``F.layer_norm`` under the identity rule, its 1 / std taken from the kernel's own output
    (``native_layer_norm``) rather than from a second pass over ``x``."""

    def forward(t: torch.Tensor):
        y, _, inv_std = torch.native_layer_norm(t, shape, weight, bias, eps)
        return y, NormLinear(t, len(shape), weight, eps, True, inv_std=inv_std)

    return NormGradFn.apply(x, forward)


class SoftmaxGradFn(SoftmaxFn):
    """Softmax forward (``nonlinear.SoftmaxFn``'s); backward its gradient, which is AttnLRP's softmax
    rule here, recording the rule's bias term sum(s g) - sum(x g_x) per sample (masked, -inf,
    inputs take no relevance)."""

    @staticmethod
    def backward(ctx, grad):
        x, s = ctx.saved_tensors
        r = s * grad.to(s.dtype)  # R_s
        g = r - s * r.sum(ctx.dim, keepdim=True)
        if ctx.record is not None:
            ctx.record(r - x.nan_to_num(0.0, 0.0, 0.0) * g)
        return g.to(x.dtype), None, None, None
