"""DeepLIFT (Shrikumar et al. 2017; the review's section 5.2, Eq. 19-25).

Contributions are differences from a reference (a black image by default: ``baseline="zeros"``):
C(x_i) = m_i * (x_i - x0_i), with multipliers m (Eq. 20) chained backwards (Eq. 21) through

- the linear rule for convolutions, dense layers, batch norms, pooling averages and additions
  (m = w, i.e. the ordinary gradient);
- the rescale rule for every ReLU and other element-wise nonlinearity: m = dz/dy = (g(y) - g(y0)) /
  (y - y0), falling back to the gradient where |y - y0| < eps (as Captum);
- the reveal-cancel rule (Eq. 23-25, ``rule="reveal_cancel"``): the ReLU's input difference is split
  into the sums of the positive and negative terms of the layer below, dy+ = sum_i (w_i dx_i)^+ and
  dy- = sum_i (w_i dx_i)^-; dz+ and dz- are Eq. 23-24 and m+ = dz+/dy+, m- = dz-/dy- (Eq. 25)
  are sent back only along the positive, respectively negative, terms. The split is carried
  through batch norms (a per-channel scale; a negative scale swaps the parts) and additions (the
  parts add; an operand with no split contributes its own difference as one term); a ReLU whose
  input has no split (after a max-pool, or the input) uses rescale, to which reveal-cancel reduces
  when there is a single term;
- max pooling as Captum: the output difference is split as (max(y, y0) - y0) + (y - max(y, y0)),
  the first part routed to the input's maximum, the second to the reference's, and divided by
  the input difference; routing *adds up* where pooling windows overlap (Captum's ``max_unpool``
  overwrites there, losing relevance on ResNet's 3x3/2 max-pool; identical on VGG's 2x2/2 ones).

Implementation: the reference goes through the model first (no gradient, batch 1 when one
reference serves the whole batch), recording each nonlinearity's input and output; then the
input runs with gradient under a ``TorchFunctionMode`` that replaces each nonlinearity, in the
same order, by a custom autograd function whose backward applies the rule. So the backward pass
only covers the B inputs (Captum runs input and reference as one 2B batch, forward and backward),
every ReLU spelling is caught (``nn.ReLU`` reused or in place, ``F.relu`` in ``forward``), and the
model is not touched. Summation to delta (Eq. 19): the attributions of a sample add up to
f_c(x) - f_c(x0), reported in ``extras["delta"]``.

Several references (``baseline`` a list of tensors, or ``samples`` > 1 with ``noise``) average the
attributions over them, as Captum's ``DeepLiftShap`` / the review's gradient-SHAP.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .canonizers import batch_norm_args
from .lrp import eval_mode, frozen_parameters
from .ops import (
    ACTIVATION_FUNCS,
    CONV_FUNCS,
    MAXPOOL_FUNCS,
    LinearOp,
    ModuleTracker,
    activation_fn,
    add_operands,
    first_arg,
    is_relu_call,
)

_LINEAR_FUNCS = frozenset({*CONV_FUNCS, F.linear})
# operations with no DeepLIFT rule here: refused in one line naming the module (a gradient through
# them would break summation to delta silently)
_REFUSED = {
    F.softmax: "softmax",
    torch.softmax: "softmax",
    torch.Tensor.softmax: "softmax",
    F.layer_norm: "layer normalization",
    F.group_norm: "group normalization",
    F.scaled_dot_product_attention: "attention",
    F.multi_head_attention_forward: "attention",
}
if hasattr(F, "rms_norm"):
    _REFUSED[F.rms_norm] = "RMS normalization"
_PRODUCTS = frozenset(
    {
        torch.mul,
        torch.Tensor.mul,
        torch.Tensor.mul_,
        torch.matmul,
        torch.Tensor.matmul,
        torch.bmm,
        torch.Tensor.bmm,
    }
)
_POOL_WITH_INDICES = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _derivative(fn, x: torch.Tensor, grad: torch.Tensor, relu: bool) -> torch.Tensor:
    """grad * g'(x): the ordinary backward of the nonlinearity."""
    if relu:
        return grad * (x > 0)
    with torch.enable_grad():
        probe = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(probe), probe, grad)[0]


class _RescaleFn(torch.autograd.Function):
    """Rescale rule: m = (g(y) - g(y0)) / (y - y0); the gradient where |y - y0| < eps."""

    @staticmethod
    def forward(ctx, x, x_ref, y_ref, fn, relu, eps):
        y = fn(x)
        ctx.save_for_backward(x, y)
        ctx.x_ref, ctx.y_ref, ctx.fn, ctx.relu, ctx.eps = x_ref, y_ref, fn, relu, eps
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        dx = x - ctx.x_ref
        dy = y - ctx.y_ref
        small = dx.abs() < ctx.eps
        rescaled = grad * dy / torch.where(small, torch.ones_like(dx), dx)
        return (
            torch.where(small, _derivative(ctx.fn, x, grad, ctx.relu), rescaled),
            None,
            None,
            None,
            None,
            None,
        )


class _RevealCancelFn(torch.autograd.Function):
    """Reveal-cancel rule (Eq. 23-25) on a nonlinearity whose input difference is split into dy+ and
    dy-: multipliers m+ = dz+/dy+ and m- = dz-/dy- go back along the two parts, none along y."""

    @staticmethod
    def forward(ctx, y, dpos, dneg, y_ref, fn, relu, eps):
        out = fn(y)
        ctx.save_for_backward(y, dpos, dneg)
        ctx.y_ref, ctx.fn, ctx.relu, ctx.eps = y_ref, fn, relu, eps
        return out

    @staticmethod
    def backward(ctx, grad):
        y, dpos, dneg = ctx.saved_tensors
        fn, y0 = ctx.fn, ctx.y_ref
        f_y, f_0, f_p, f_n = fn(y), fn(y0), fn(y0 + dpos), fn(y0 + dneg)
        dz_pos = 0.5 * (f_p - f_0) + 0.5 * (f_y - f_n)  # Eq. 23 (y0 + dy+ + dy- = y)
        dz_neg = 0.5 * (f_n - f_0) + 0.5 * (f_y - f_p)  # Eq. 24
        fallback = _derivative(fn, y, grad, ctx.relu)
        small_p, small_n = dpos.abs() < ctx.eps, dneg.abs() < ctx.eps
        m_pos = torch.where(
            small_p, fallback, grad * dz_pos / torch.where(small_p, torch.ones_like(dpos), dpos)
        )
        m_neg = torch.where(
            small_n, fallback, grad * dz_neg / torch.where(small_n, torch.ones_like(dneg), dneg)
        )
        return None, m_pos, m_neg, None, None, None, None


def _scatter(values: torch.Tensor, indices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Max-unpooling that adds up values sent to the same input position (overlapping windows)."""
    n, c = shape[0], shape[1]
    flat = values.new_zeros(n, c, int(torch.Size(shape[2:]).numel()))
    idx = indices.expand(values.shape).reshape(n, c, -1)
    flat.scatter_add_(2, idx, values.reshape(n, c, -1))
    return flat.view(shape)


class _MaxPoolFn(torch.autograd.Function):
    """Max pooling with Captum's DeepLIFT multipliers (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, x_ref, y_ref, idx_ref, pool, eps):
        y, idx = pool(x)
        ctx.save_for_backward(x, y, idx)
        ctx.x_ref, ctx.y_ref, ctx.idx_ref, ctx.eps = x_ref, y_ref, idx_ref, eps
        ctx.mark_non_differentiable(idx)
        return y, idx

    @staticmethod
    def backward(ctx, grad, _grad_idx):
        x, y, idx = ctx.saved_tensors
        y_ref = ctx.y_ref
        cross = torch.maximum(y, y_ref)
        routed = _scatter(grad * (cross - y_ref), idx, x.shape) + _scatter(
            grad * (y - cross), ctx.idx_ref, x.shape
        )
        dx = x - ctx.x_ref
        small = dx.abs() < ctx.eps
        multiplier = routed / torch.where(small, torch.ones_like(dx), dx)
        return torch.where(small, _scatter(grad, idx, x.shape), multiplier), None, None, None, None, None


def _max_pool(func, args: tuple, kwargs: dict):
    nd = MAXPOOL_FUNCS[func]
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    pool = _POOL_WITH_INDICES[nd]
    kw = {k: bound[k] for k in ("stride", "padding", "dilation", "ceil_mode") if k in bound}
    wants_indices = bool(bound.get("return_indices", False))
    return (lambda t: pool(t, bound["kernel_size"], return_indices=True, **kw)), wants_indices


def _split(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta^+, delta^-) with the masks as their gradients (a term's multiplier follows its sign)."""
    return delta * (delta > 0), delta * (delta < 0)


class _DeepLiftMode(TorchFunctionMode):
    """``phase="reference"`` records what the rules need; ``phase="input"`` replays it in order."""

    def __init__(self, phase: str, rule: str, eps: float, entries: list | None = None):
        super().__init__()
        self.phase, self.rule, self.eps = phase, rule, eps
        self.entries: list = entries if entries is not None else []
        self.position = 0
        self.split: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.tracker: ModuleTracker | None = None

    def _next(self, kind: str, like: torch.Tensor) -> tuple:
        if self.position >= len(self.entries):
            raise RuntimeError(
                "DeepLIFT: the model ran more operations on the input than on the reference; "
                "its forward must not depend on the input values"
            )
        entry = self.entries[self.position]
        self.position += 1
        ref = entry[1]
        if entry[0] != kind or ref.shape[1:] != like.shape[1:]:
            raise RuntimeError(
                f"DeepLIFT: operation {self.position} differs between input and reference "
                f"({kind} {tuple(like.shape)} vs {entry[0]} {tuple(ref.shape)})"
            )
        return entry

    def refuse(self, what: str) -> None:
        from xai_plugins import InputError

        where = self.tracker.current() if self.tracker is not None else "the model's forward"
        raise InputError(
            f"deeplift cannot explain {where}: {what} has no DeepLIFT rule here "
            "(use integrated_gradients, which needs none)"
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _REFUSED:
            self.refuse(_REFUSED[func])
        if (
            self.phase == "input"
            and func in _PRODUCTS
            and len(args) == 2
            and all(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        ):
            self.refuse("a product of two activations (gating, attention)")
        relu = is_relu_call(func, args, kwargs)
        if relu or func in ACTIVATION_FUNCS:
            return self._activation(func, args, kwargs, relu)
        if func in MAXPOOL_FUNCS:
            return self._max_pool(func, args, kwargs)
        if self.rule == "reveal_cancel":
            if func in _LINEAR_FUNCS:
                return self._linear(func, args, kwargs)
            if func is F.batch_norm:
                return self._batch_norm(func, args, kwargs)
            operands = add_operands(func, args, kwargs)
            if operands is not None:
                return self._add(func, args, kwargs, operands)
        return func(*args, **kwargs)

    # -- nonlinearities ------------------------------------------------------------------------
    def _activation(self, func, args, kwargs, relu):
        x = first_arg(args, kwargs)
        fn = activation_fn(func, args, kwargs)
        if self.phase == "reference":
            y = fn(x)
            self.entries.append(("act", x, y))
            return y
        _, x_ref, y_ref = self._next("act", x)
        parts = self.split.get(id(x))
        if parts is not None and parts[0] is x:
            return _RevealCancelFn.apply(x, parts[1], parts[2], x_ref, fn, relu, self.eps)
        return _RescaleFn.apply(x, x_ref, y_ref, fn, relu, self.eps)

    def _max_pool(self, func, args, kwargs):
        x = first_arg(args, kwargs)
        pool, wants_indices = _max_pool(func, args, kwargs)
        if self.phase == "reference":
            y, idx = pool(x)
            self.entries.append(("max", x, y, idx))
            return (y, idx) if wants_indices else y
        _, x_ref, y_ref, idx_ref = self._next("max", x)
        y, idx = _MaxPoolFn.apply(x, x_ref, y_ref, idx_ref, pool, self.eps)
        return (y, idx) if wants_indices else y

    # -- reveal-cancel: carry (dy+, dy-) from the linear layers to the nonlinearities -------------
    def _parts(self, t: torch.Tensor, t_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = self.split.get(id(t))
        if parts is not None and parts[0] is t:
            return parts[1], parts[2]
        return _split(t - t_ref)

    def _linear(self, func, args, kwargs):
        x = first_arg(args, kwargs)
        y = func(*args, **kwargs)
        if self.phase == "reference":
            self.entries.append(("linear", x))
            return y
        _, x_ref = self._next("linear", x)
        op = LinearOp(func, args, kwargs)
        w = op.weight.detach()
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        pos, neg = _split(x - x_ref)
        if op.groups == 1:
            p1, n1 = op.split(op(pos, torch.cat([wp, wn]), None), [w.shape[0]] * 2)
            p2, n2 = op.split(op(neg, torch.cat([wn, wp]), None), [w.shape[0]] * 2)
        else:
            p1, n1, p2, n2 = op(pos, wp, None), op(pos, wn, None), op(neg, wn, None), op(neg, wp, None)
        self.split[id(y)] = (y, p1 + p2, n1 + n2)  # sum_i (w_i dx_i)^+ and ^- (the bias cancels)
        return y

    def _batch_norm(self, func, args, kwargs):
        bn = batch_norm_args(args, kwargs)
        x = bn["input"]
        y = func(*args, **kwargs)
        if self.phase == "reference":
            self.entries.append(("bn", x))
            return y
        self._next("bn", x)
        parts = self.split.get(id(x))
        if parts is not None and parts[0] is x and bn["running_var"] is not None and not bn["training"]:
            scale = torch.rsqrt(bn["running_var"].detach() + bn["eps"])
            if bn["weight"] is not None:
                scale = scale * bn["weight"].detach()
            scale = scale.view(1, -1, *([1] * (x.dim() - 2)))
            sp, sn = scale.clamp(min=0), scale.clamp(max=0)
            self.split[id(y)] = (y, sp * parts[1] + sn * parts[2], sn * parts[1] + sp * parts[2])
        return y

    def _add(self, func, args, kwargs, operands):
        a, b = operands
        out = func(*args, **kwargs) if func is not torch.Tensor.add_ else torch.add(a, b)
        if self.phase == "reference":
            self.entries.append(("add", a, b))
            return out
        _, a_ref, b_ref = self._next("add", a)
        pa, na = self._parts(a, a_ref)
        pb, nb = self._parts(b, b_ref)
        self.split[id(out)] = (out, pa + pb, na + nb)
        return out


def references(
    baseline: Any, x: torch.Tensor, samples: int = 1, noise: float = 0.0, seed: int | None = 0
) -> torch.Tensor:
    """The references as an S x B' x C x H x W tensor (B' = 1 when one reference serves all inputs).

    ``baseline``: "zeros"/None (a black image, the review's default), a number, a tensor shaped like
    one input or like the batch, or a list of those (several references, averaged over). With
    ``samples`` > 1, that many references are drawn from them (seeded) and ``noise`` times each
    input's value range of Gaussian noise is added (gradient-SHAP style).
    """
    from xai_plugins.toolkit import resolve_baseline

    def one(value: Any) -> torch.Tensor:
        if value is not None and not isinstance(value, (str, int, float, torch.Tensor)):
            value = torch.as_tensor(value)  # arrays and nested lists
        return resolve_baseline(value, x)

    values = list(baseline) if isinstance(baseline, (list, tuple)) else [baseline]
    refs = [one(v) for v in values]
    if len({r.shape[0] for r in refs}) > 1:
        refs = [r.expand(x.shape[0], *x.shape[1:]) for r in refs]
    pool = torch.stack(refs)
    if samples is None or samples <= 1:
        return pool
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else int(seed))
    pick = torch.randint(len(refs), (int(samples),), generator=gen)
    chosen = pool[pick].expand(int(samples), x.shape[0], *x.shape[1:])
    if noise:
        dims = tuple(range(1, x.dim()))
        span = (x.amax(dims, keepdim=True) - x.amin(dims, keepdim=True)).unsqueeze(0)
        eps = torch.randn(chosen.shape, generator=gen, dtype=x.dtype).to(x.device)
        chosen = chosen + float(noise) * span * eps
    return chosen.contiguous()


def deeplift(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    rule: str = "rescale",
    baseline: Any = "zeros",
    samples: int = 1,
    noise: float = 0.0,
    seed: int | None = 0,
    eps: float = 1e-10,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """DeepLIFT attributions (B x C x H x W) of each sample's target logit; ``extras["delta"]`` holds
    f_c(x) - f_c(x0) (averaged over the references), which the attributions sum to (Eq. 19)."""
    x = inputs.detach()
    refs = references(baseline, x, samples, noise, seed)
    n_refs, b = refs.shape[0], x.shape[0]
    if n_refs == 1:
        ref, xs = refs[0], x
    else:
        ref = refs.expand(n_refs, b, *x.shape[1:]).reshape(n_refs * b, *x.shape[1:])
        xs = x.repeat(n_refs, *([1] * (x.dim() - 1)))
    t = targets.to(x.device).long().view(-1).repeat(n_refs)
    with eval_mode(model), frozen_parameters(model), ModuleTracker(model) as tracker:
        recorder = _DeepLiftMode("reference", rule, eps)
        recorder.tracker = tracker
        with torch.no_grad(), recorder:
            ref_logits = model(ref)
        xin = xs.clone().requires_grad_(True)
        replay = _DeepLiftMode("input", rule, eps, recorder.entries)
        replay.tracker = tracker
        with torch.enable_grad():
            with replay:
                logits = model(xin)
            if replay.position != len(recorder.entries):
                raise RuntimeError(
                    "DeepLIFT: the model ran fewer operations on the input than on the reference"
                )
            replay.split.clear()
            seed_grad = torch.zeros_like(logits).scatter_(1, t.view(-1, 1), 1.0)
            (grad,) = torch.autograd.grad(logits, xin, seed_grad)
    attributions = ((xs - ref) * grad).view(n_refs, b, *x.shape[1:]).mean(0)
    score = logits.detach().gather(1, t.view(-1, 1)).view(n_refs, b)
    ref_full = ref_logits.expand(t.numel(), -1) if ref_logits.shape[0] == 1 else ref_logits
    ref_score = ref_full.gather(1, t.view(-1, 1)).view(n_refs, b)
    delta = (score - ref_score).mean(0)
    return attributions.detach(), {"delta": delta, "reference_logit": ref_score.mean(0)}
