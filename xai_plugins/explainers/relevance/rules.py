"""LRP rules for linear layers (review Eq. 12-15) and the deep Taylor rules (Montavon et al. 2017).

Every rule has the form of Zennit's ``BasicHook``: a list of *terms*, each a forward of the layer
with a modified input and modified parameters, ``z_k = L(in_k; W_k, b_k)``; the terms are summed
(with signs) into one or more denominators ``z``, and the relevance R of the layer's output is
redistributed to its input as

    R_in = sum_k coef_k * in_k * W_k^T (R / stab(z_group(k)))                     (generic form)

which is the modified-gradient form of the review's rules: for LRP-0 (Eq. 12) there is one term
(in = a, W, b) and ``R_in = a * W^T (R / z)``; epsilon (Eq. 13) adds epsilon * sign(z) to z; gamma
(Eq. 14) uses W + gamma W^+; alpha-beta (Eq. 15) splits the products (a w)^+ and (a w)^- into two
denominators weighted alpha and -beta.

Unlike Zennit, a rule is not a module hook re-running the layer in the backward pass: the layer's
custom autograd function (``lrp.py``) calls ``relevance`` once with the saved input/output, and
terms that read the same input are stacked along the output channels so one convolution computes
them all and one transposed convolution (``LinearOp.vjp``) sends them all back. Terms whose input
is identically zero (``a^-`` after a ReLU) are skipped; the unmodified term ``L(a; W, b)`` is the
layer's own output and is not recomputed.

Definitions follow Zennit 0.5 exactly (stabilizer ``z + eps * sign(z)`` with sign(0) = +1, bias
handling of each term), so results agree with it to float precision. Where the review's equations
differ: Eq. 13 adds epsilon (not epsilon * sign(z)) -- the signed form keeps the denominator away
from zero for negative z too; the gamma rule is Zennit's generalized form (Andeol et al. 2021),
identical to Eq. 14 on the non-negative inputs that follow a ReLU, and for negative outputs it uses
W + gamma W^- symmetrically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .ops import LinearOp


def stabilize(z: torch.Tensor, eps: float | None) -> torch.Tensor:
    """Zennit's stabilizer: ``z + eps * sign(z)`` with sign(0) = +1. ``eps=None`` (LRP-0): exact
    division, where z == 0 the quotient is 0 (the denominator becomes infinite)."""
    if eps is None:
        return torch.where(z == 0, float("inf"), z)
    # sign(z) + 0.5 has the sign of z, and + for 0 (and -0): sign(z) with sign(0) = +1. Exactly
    # z + (eps if z >= 0 else -eps), in one pass each instead of a scalar where (12x slower)
    return z.sign().add_(0.5).sign_().mul_(eps).add_(z)


_MODIFIERS = {
    "id": lambda p, g: p,
    "pos": lambda p, g: p.clamp(min=0),
    "neg": lambda p, g: p.clamp(max=0),
    "gamma_pos": lambda p, g: p + g * p.clamp(min=0),
    "gamma_neg": lambda p, g: p + g * p.clamp(max=0),
    "ones": lambda p, g: torch.ones_like(p),
    "square": lambda p, g: p * p,
}


@dataclass(frozen=True)
class Term:
    """One modified forward ``z_k = L(input; weight(W), bias(b))`` of a rule.

    ``input``: "x" (the activations a), "pos" (a^+), "neg" (a^-), "ones", "low"/"high" (z^B bounds).
    ``weight``/``bias``: a name in ``_MODIFIERS``; ``bias=None`` leaves the bias out of this term.
    ``group``: which denominator the term belongs to; ``sign``: its sign in that denominator;
    ``coef``: its factor in the redistribution (alpha, -beta, or the sign for z^B).
    """

    input: str
    weight: str
    bias: str | None
    group: int = 0
    sign: float = 1.0
    coef: float = 1.0


@dataclass(frozen=True)
class Group:
    """A denominator: the stabilizer (None: exact, LRP-0) and an optional mask on the sign of the
    layer's real output (the generalized gamma rule treats positive and negative outputs apart)."""

    stabilizer: float | None
    mask: str | None = None


@dataclass
class _Chunk:
    key: str
    terms: list[int]
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    sizes: list[int]
    biases: list[torch.Tensor | None]


@dataclass
class Prepared:
    """A rule's modified parameters for one layer (cached per model): the shortcut's (``fast``) and,
    built on first use only, the generic per-input stacks (forward chunks, backward chunks, the
    indices of unmodified terms) -- a layer that always takes the shortcut never pays for them."""

    build: Callable[[], tuple[list[_Chunk], list[_Chunk], list[int]]]
    fast: tuple | None = None
    # the bias a rule that leaves biases out subtracts from the output before choosing the
    # positive / negative branch by its sign (Zennit's ``zero_params``): the branch then matches
    # its denominator, which never crosses zero (the residual nets' relevance stayed bounded)
    shift: torch.Tensor | None = None
    _generic: tuple | None = field(default=None, repr=False)

    def generic(self) -> tuple[list[_Chunk], list[_Chunk], list[int]]:
        if self._generic is None:
            self._generic = self.build()
        return self._generic


class Rule:
    """Base class: ``relevance(op, x, y, prepared, R)`` returns the relevance of the layer input."""

    name: str = ""
    input_layer_only: bool = False
    is_gradient = False  # the rule is gradient x input (``gradient_domain.py``)

    def key(self) -> tuple:
        raise NotImplementedError

    def prepare(self, op: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None) -> Any:
        return None

    def relevance(
        self,
        op: LinearOp,
        x: torch.Tensor,
        y: torch.Tensor,
        prepared: Any,
        relevance: torch.Tensor,
        nonneg: bool | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class BasicRule(Rule):
    """A rule given by its terms and denominators (see the module docstring)."""

    def __init__(
        self,
        name: str,
        terms: list[Term],
        groups: list[Group],
        gamma: float = 0.0,
        low: Any = None,
        high: Any = None,
        input_layer_only: bool = False,
        fast: str | None = None,
    ):
        self.name, self.terms, self.groups, self.gamma = name, tuple(terms), tuple(groups), float(gamma)
        self.low, self.high = low, high
        self.input_layer_only = input_layer_only
        self._signed = any(t.input in ("pos", "neg") for t in self.terms)
        # a shortcut with the same result: "identity" (one unmodified term), "alpha_beta" and
        # "gamma" (on non-negative inputs, where the a^- terms vanish)
        self.fast = fast

    def key(self) -> tuple:
        return (self.name, self.terms, self.groups, self.gamma)

    @property
    def is_gradient(self) -> bool:
        """LRP-0 / epsilon with eps <= 1e-6 and the bias in the denominator: R_x = x * W^T (R / z),
        which is gradient x input (``gradient_domain.py``) up to the vanishing stabilizer."""
        return (
            self.name in ("zero", "epsilon")
            and all(t == Term("x", "id", "id") for t in self.terms)
            and all(g.mask is None and (g.stabilizer is None or g.stabilizer <= 1e-6) for g in self.groups)
        )

    # -- parameters ------------------------------------------------------------------------------
    def _is_identity(self, term: Term, bias: torch.Tensor | None) -> bool:
        return term.input == "x" and term.weight == "id" and (term.bias == "id" or bias is None)

    def prepare(self, op: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None) -> Prepared:
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        identity = [i for i, t in enumerate(self.terms) if self._is_identity(t, bias)]
        masked = any(g.mask for g in self.groups)
        unbiased = all(t.bias is None for t in self.terms)
        return Prepared(
            lambda: self._prepare_generic(op, weight, bias, identity),
            self._prepare_fast(op, weight, bias, identity),
            shift=bias if masked and unbiased else None,
        )

    def _prepare_generic(
        self, op: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None, identity: list[int]
    ) -> tuple[list[_Chunk], list[_Chunk], list[int]]:
        mod_w = [_MODIFIERS[t.weight](weight, self.gamma) for t in self.terms]
        mod_b = [
            _MODIFIERS[t.bias](bias, self.gamma) if (t.bias is not None and bias is not None) else None
            for t in self.terms
        ]
        by_key: dict[str, list[int]] = {}
        for i, t in enumerate(self.terms):
            by_key.setdefault(t.input, []).append(i)
        stack = op.groups == 1  # stacking along output channels breaks grouped convolutions

        def chunks(indices: list[int], key: str, with_bias: bool) -> list[_Chunk]:
            parts = [indices] if stack else [[i] for i in indices]
            out = []
            for part in parts:
                if not part:
                    continue
                w = torch.cat([mod_w[i] for i in part]) if len(part) > 1 else mod_w[part[0]]
                b = None
                if with_bias and any(mod_b[i] is not None for i in part):
                    bs = [
                        mod_b[i] if mod_b[i] is not None else weight.new_zeros(weight.shape[0]) for i in part
                    ]
                    b = torch.cat(bs) if len(bs) > 1 else bs[0]
                out.append(_Chunk(key, part, w, b, [weight.shape[0]] * len(part), [mod_b[i] for i in part]))
            return out

        forward, backward = [], []
        for key, indices in by_key.items():
            forward += chunks([i for i in indices if i not in identity], key, True)
            backward += chunks(indices, key, False)
        return forward, backward, identity

    def _prepare_fast(
        self, op: LinearOp, weight: torch.Tensor, bias: torch.Tensor | None, identity: list[int]
    ) -> tuple | None:
        if self.fast == "identity" and identity == [0] and len(self.terms) == 1:
            return ("identity", weight)
        if self.fast not in ("alpha_beta", "gamma") or op.groups != 1:
            return None
        eps = self.groups[0].stabilizer or 0.0
        use_bias = bias is not None and self.terms[0].bias is not None
        zeros = weight.new_zeros(weight.shape[0])
        if self.fast == "alpha_beta":
            alpha = self.terms[0].coef
            beta = -self.terms[2].coef if len(self.terms) > 2 else 0.0
            w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
            b_pos = bias.clamp(min=0) if use_bias else zeros
            b_neg = bias.clamp(max=0) if use_bias else zeros
            if not beta:
                return ("alpha_beta", w_pos, b_pos + eps, alpha * w_pos if alpha != 1 else w_pos, 1)
            # z+ >= 0 and z- <= 0 on non-negative inputs: the stabilizer is a constant shift, folded
            # into the bias (where z = 0 every product is 0, so the sign given to eps does not matter)
            return (
                "alpha_beta",
                torch.cat([w_pos, w_neg]),
                torch.cat([b_pos + eps, b_neg - eps]),
                torch.cat([alpha * w_pos, -beta * w_neg]),
                2,
            )
        g = self.gamma
        w_pp, w_pn = weight + g * weight.clamp(min=0), weight + g * weight.clamp(max=0)
        b_pp = bias + g * bias.clamp(min=0) if use_bias else zeros
        b_pn = bias + g * bias.clamp(max=0) if use_bias else zeros
        # on non-negative inputs z(W + gW+) >= y > 0 where y > 0 and z(W + gW-) <= y < 0 where y < 0
        w = torch.cat([w_pp, w_pn])
        return ("gamma", w, torch.cat([b_pp + eps, b_pn - eps]), w, 2)

    def _relevance_fast(
        self,
        op: LinearOp,
        x: torch.Tensor,
        y: torch.Tensor,
        fast: tuple,
        relevance: torch.Tensor,
        nonneg: bool | None,
    ) -> torch.Tensor | None:
        if fast[0] == "identity":
            g = relevance / stabilize(y, self.groups[0].stabilizer)
            return op.vjp(g, fast[1], x).mul_(x)
        if nonneg is None:
            nonneg = not bool((x < 0).any())
        if not nonneg:
            return None
        _, w_fwd, b_fwd, w_bwd, parts = fast
        grad = op(x, w_fwd, b_fwd).reciprocal_()
        if parts == 1:
            grad.mul_(relevance)
        elif fast[0] == "alpha_beta":
            op.stacked_view(grad, 2).mul_(relevance.unsqueeze(op.stack_dim))
        else:
            view = op.stacked_view(grad, 2)
            view.select(op.stack_dim, 0).mul_(torch.where(y > 0, relevance, 0.0))
            view.select(op.stack_dim, 1).mul_(torch.where(y < 0, relevance, 0.0))
        return op.vjp(grad, w_bwd, x).mul_(x)

    # -- inputs ----------------------------------------------------------------------------------
    def _bound(self, value: Any, x: torch.Tensor, low: bool) -> torch.Tensor:
        if value is None:  # per sample and channel: the smallest box holding the input
            dims = tuple(range(2, x.dim())) if x.dim() > 2 else (1,)
            return x.detach().amin(dims, keepdim=True) if low else x.detach().amax(dims, keepdim=True)
        t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
        if t.dim() == 1 and x.dim() > 2 and t.numel() == x.shape[1]:
            t = t.view(1, -1, *([1] * (x.dim() - 2)))
        while t.dim() < x.dim():
            t = t.unsqueeze(0)
        return t

    def _inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        nonneg = nonpos = False
        if self._signed:
            nonneg = not bool((x < 0).any())
            nonpos = not nonneg and not bool((x > 0).any())
        inputs: dict[str, torch.Tensor | None] = {"x": x}
        for t in self.terms:
            if t.input == "pos":
                inputs["pos"] = None if nonpos else (x if nonneg else x.clamp(min=0))
            elif t.input == "neg":
                inputs["neg"] = None if nonneg else (x if nonpos else x.clamp(max=0))
            elif t.input == "ones":
                inputs["ones"] = x.new_ones((1, *x.shape[1:]))
            elif t.input in ("low", "high"):
                bound = self._bound(self.low if t.input == "low" else self.high, x, t.input == "low")
                inputs[t.input] = bound.expand(bound.shape[0], *x.shape[1:]).contiguous()
        return inputs

    # -- relevance -------------------------------------------------------------------------------
    def relevance(
        self,
        op: LinearOp,
        x: torch.Tensor,
        y: torch.Tensor,
        prepared: Prepared,
        relevance: torch.Tensor,
        nonneg: bool | None = None,
    ) -> torch.Tensor:
        """Input relevance; ``nonneg``: whether x >= 0 is known (None: check)."""
        if prepared.shift is not None:
            y = y - op.bias_view(prepared.shift, y.dim())
        if prepared.fast is not None:
            result = self._relevance_fast(op, x, y, prepared.fast, relevance, nonneg)
            if result is not None:
                return result
        forward, backward, identity = prepared.generic()
        inputs = self._inputs(x)
        outs: list[torch.Tensor | None] = [None] * len(self.terms)
        for i in identity:
            outs[i] = y
        for chunk in forward:
            inp = inputs[chunk.key]
            if inp is None:  # identically zero input: the term is its bias alone
                for i, b in zip(chunk.terms, chunk.biases):
                    outs[i] = op.bias_view(b, y.dim()) if b is not None else None
                continue
            z = op(inp, chunk.weight, chunk.bias)
            for i, zi in zip(chunk.terms, op.split(z, chunk.sizes)):
                outs[i] = zi
        grads: list[torch.Tensor | None] = []
        for gi, group in enumerate(self.groups):
            den = None
            for i, t in enumerate(self.terms):
                if t.group == gi and outs[i] is not None:
                    part = outs[i] if t.sign == 1 else t.sign * outs[i]
                    den = part if den is None else den + part
            if den is None:
                grads.append(None)
                continue
            g = relevance / stabilize(den.expand_as(relevance), group.stabilizer)
            if group.mask == "pos":
                g = torch.where(y > 0, g, 0.0)
            elif group.mask == "neg":
                g = torch.where(y < 0, g, 0.0)
            grads.append(g)
        result = None
        for chunk in backward:
            inp = inputs[chunk.key]
            if inp is None:
                continue
            parts = []
            for i in chunk.terms:
                t = self.terms[i]
                g = grads[t.group]
                if g is None:
                    g = torch.zeros_like(relevance)
                parts.append(g if t.coef == 1 else t.coef * g)
            back = op.vjp(op.cat(parts), chunk.weight, x)
            contribution = back if chunk.key == "ones" else inp * back
            result = contribution if result is None else result + contribution
        return result if result is not None else torch.zeros_like(x)


# -- the rules ---------------------------------------------------------------------------------------
def zero(zero_bias: bool = False) -> BasicRule:
    """LRP-0 (review Eq. 12): R_i = sum_j a_i w_ij / (sum_q a_q w_qj + b_j) R_j."""
    return BasicRule("zero", [Term("x", "id", None if zero_bias else "id")], [Group(None)], fast="identity")


def epsilon(eps: float = 1e-6, zero_bias: bool = False) -> BasicRule:
    """LRP-epsilon (review Eq. 13), with the denominator z + eps * sign(z) (Zennit ``Epsilon``)."""
    return BasicRule(
        "epsilon", [Term("x", "id", None if zero_bias else "id")], [Group(float(eps))], fast="identity"
    )


def gamma(gamma: float = 0.25, stabilizer: float = 1e-6, zero_bias: bool = False) -> BasicRule:
    """LRP-gamma (review Eq. 14): weights W + gamma W^+ for positive outputs (and W + gamma W^- for
    negative ones, Zennit's generalized ``Gamma``); the bias likewise (b + gamma b^+)."""
    nb = None if zero_bias else "gamma_pos"
    nbn = None if zero_bias else "gamma_neg"
    terms = [
        Term("pos", "gamma_pos", nb, 0),
        Term("neg", "gamma_neg", None, 0),
        Term("pos", "gamma_neg", nbn, 1),
        Term("neg", "gamma_pos", None, 1),
    ]
    return BasicRule(
        "gamma",
        terms,
        [Group(float(stabilizer), "pos"), Group(float(stabilizer), "neg")],
        gamma=gamma,
        fast="gamma",
    )


def alpha_beta(
    alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6, zero_bias: bool = False
) -> BasicRule:
    """LRP-alpha-beta (review Eq. 15), alpha = beta + 1, on the products: (a w)^+ = a^+ w^+ + a^- w^-
    with the positive bias in the positive denominator, (a w)^- = a^+ w^- + a^- w^+ likewise."""
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9:
        raise ValueError(f"alpha-beta needs alpha = beta + 1 >= 1, got alpha={alpha}, beta={beta}")
    terms = [
        Term("pos", "pos", None if zero_bias else "pos", 0, 1.0, float(alpha)),
        Term("neg", "neg", None, 0, 1.0, float(alpha)),
    ]
    groups = [Group(float(stabilizer))]
    if beta:
        terms += [
            Term("pos", "neg", None if zero_bias else "neg", 1, 1.0, -float(beta)),
            Term("neg", "pos", None, 1, 1.0, -float(beta)),
        ]
        groups.append(Group(float(stabilizer)))
    return BasicRule("alpha_beta", terms, groups, fast="alpha_beta")


def z_plus(stabilizer: float = 1e-6, zero_bias: bool = False) -> BasicRule:
    """Deep Taylor z+ rule (Montavon et al. 2017), = alpha1-beta0: only the positive products."""
    rule = alpha_beta(1.0, 0.0, stabilizer, zero_bias)
    rule.name = "z_plus"
    return rule


def z_box(low: Any = None, high: Any = None, stabilizer: float = 1e-6, zero_bias: bool = False) -> BasicRule:
    """Deep Taylor z^B rule for a bounded input l <= x <= h (Montavon et al. 2017):
    z = x w - l w^+ - h w^-, R_in = x W^T s - l W+^T s - h W-^T s with s = R / z. ``low``/``high``:
    numbers, per-channel sequences or tensors; None takes each image's per-channel min/max."""
    nb = None if zero_bias else "id"
    terms = [
        Term("x", "id", nb, 0, 1.0, 1.0),
        Term("low", "pos", None if zero_bias else "pos", 0, -1.0, -1.0),
        Term("high", "neg", None if zero_bias else "neg", 0, -1.0, -1.0),
    ]
    return BasicRule("z_box", terms, [Group(float(stabilizer))], low=low, high=high, input_layer_only=True)


def flat(stabilizer: float = 1e-6) -> BasicRule:
    """Flat rule (Lapuschkin et al. 2019): relevance spread uniformly over the receptive field
    (all weights and inputs set to one, no bias)."""
    return BasicRule("flat", [Term("ones", "ones", None)], [Group(float(stabilizer))], input_layer_only=True)


def w_square(stabilizer: float = 1e-6, zero_bias: bool = False) -> BasicRule:
    """w^2 rule (Montavon et al. 2017) for an unbounded input layer: R_i = sum_j w_ij^2 / sum_q w_qj^2 R_j
    (Zennit ``WSquare``: the bias, squared, joins the denominator unless ``zero_bias``)."""
    return BasicRule(
        "w_square",
        [Term("ones", "square", None if zero_bias else "square")],
        [Group(float(stabilizer))],
        input_layer_only=True,
    )


RULES = ("zero", "epsilon", "gamma", "alpha_beta", "z_plus", "z_box", "flat", "w_square")


def make_rule(name: str, config: dict[str, Any]) -> Rule:
    """A rule by name, parameterized from the explainer's configuration."""
    zb = bool(config.get("zero_bias", False))
    stab = config.get("stabilizer", 1e-6)
    if name in ("zero", "lrp_0", "0"):
        return zero(zb)
    if name == "epsilon":
        return epsilon(config.get("epsilon", 1e-6), zb)
    if name == "gamma":
        return gamma(config.get("gamma", 0.25), stab, zb)
    if name == "alpha_beta":
        return alpha_beta(config.get("alpha", 2.0), config.get("beta", 1.0), stab, zb)
    if name == "z_plus":
        return z_plus(stab, zb)
    if name == "z_box":
        return z_box(config.get("low"), config.get("high"), stab, zb)
    if name == "flat":
        return flat(stab)
    if name == "w_square":
        return w_square(stab, zb)
    raise KeyError(name)
