"""Layer-wise relevance propagation (Bach et al. 2015; the review's section 5.1, Eq. 11-15, and the
deep Taylor view, Eq. 16-18) as one forward and one backward pass.

How it runs: the model's own ``forward`` executes once under a ``TorchFunctionMode``. Each call of a
linear layer (``F.conv*d``/``F.linear``) is wrapped in a custom autograd function that computes the
ordinary output and, in the backward pass, maps the output relevance R to the input relevance with
the layer's rule (``rules.py``), using one (stacked) modified forward and one transposed
convolution. Batch norms, residual additions, pooling and activations get their canonical
treatment on the fly (``canonizers.py``). Seeding the backward pass with R = S_c(x) at the target
logit (Eq. 11: the output neuron's relevance is its pre-softmax activation) and zero elsewhere, one
``torch.autograd.grad`` returns the input relevance.

Compared with Zennit: no module hooks, no parameter swapping, no re-running each layer inside its
backward hook, and nothing to undo: the model is never modified (reused and in-place ReLU modules,
``F.relu`` in ``forward`` and ``out += identity`` need no special handling). Modified parameters
(folded batch norms, W^+ stacks, ...) are kept in the model's session (one run, or a
``with session(model)`` block; ``xai_plugins.toolkit.derived``).

Where every rule of a run is a modified gradient (the ``attn_lrp`` composite with its defaults,
``gradient_domain_applies``), the same mode runs in the gradient domain instead
(``gradient_domain.py``): linear layers, sums and pooling run natively, the non-linear rules as
modified gradients, attention on the fused kernel, and the input relevance is x * g, as LXT
computes AttnLRP (ViT-B/16: from 1.46x to 0.97x the limit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from xai_plugins.toolkit import structural

from . import attention
from . import canonizers as canon
from . import gradient_domain as gd
from . import nonlinear as nl
from .composites import COMPOSITES, Composite, LayerInfo, make_composite
from .ops import (
    ACTIVATION_FUNCS,
    AVGPOOL_FUNCS,
    CONV_FUNCS,
    MAXPOOL_FUNCS,
    LinearOp,
    ModuleTracker,
    activation_fn,
    add_operands,
    first_arg,
    is_relu_call,
)
from .rules import RULES, Rule

_LINEAR_FUNCS = frozenset({*CONV_FUNCS, torch.nn.functional.linear})
# operations whose output is non-negative when their input is (tracked so that rules can skip the
# a^- terms without looking at the data)
_KEEPS_SIGN = frozenset(
    {
        *MAXPOOL_FUNCS,
        *AVGPOOL_FUNCS,
        torch.flatten,
        torch.Tensor.flatten,
        torch.Tensor.view,
        torch.Tensor.reshape,
        torch.reshape,
        torch.Tensor.contiguous,
        torch.nn.functional.dropout,
        torch.nn.functional.adaptive_max_pool2d,
    }
)


_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})
_MATMUL = frozenset({torch.matmul, torch.Tensor.matmul, torch.bmm, torch.Tensor.bmm})
_MUL = frozenset({torch.mul, torch.Tensor.mul, torch.Tensor.mul_})
_DIV = frozenset({torch.div, torch.Tensor.div, torch.Tensor.div_})
_ADD_SUB = {
    torch.add: 1.0,
    torch.Tensor.add: 1.0,
    torch.Tensor.add_: 1.0,
    torch.sub: -1.0,
    torch.Tensor.sub: -1.0,
    torch.Tensor.sub_: -1.0,
}
# a product with the output of one of these is a gate (squeeze-excitation, explicit SiLU x * sigmoid(x))
_GATES = frozenset(
    {torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, torch.sigmoid_, F.hardsigmoid}
)
_MEAN = frozenset({torch.mean, torch.Tensor.mean})  # token / spatial averages: proportional split
_RMS_NORM = getattr(F, "rms_norm", None)
# normalizations whose statistics mix samples or groups in ways no rule here covers: refused
_REFUSED = {
    F.group_norm: "group normalization has no LRP rule here",
    F.instance_norm: "instance normalization has no LRP rule here",
    F.local_response_norm: "local response normalization has no LRP rule here",
}


def _active(t: Any) -> bool:
    """An activation (depends on the input): parameters are frozen for the explained forward."""
    return isinstance(t, torch.Tensor) and t.requires_grad


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters and buffers without ``requires_grad`` for the block (restored after), so that every
    tensor requiring a gradient is an activation and everything else a constant of the rules."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put the model in eval mode for the block and restore every module's flag after."""
    training = [(m, m.training) for m in model.modules()]
    try:
        if any(flag for _, flag in training):
            model.eval()
        yield
    finally:
        for m, flag in training:
            m.training = flag


class _Node:
    """One linear-layer call: its operator, rule, and (when a batch norm follows) folding."""

    __slots__ = ("op", "rule", "info", "session", "fold", "y_ref", "nonneg")

    def __init__(self, op: LinearOp, rule: Rule, info: LayerInfo, session: _Session, nonneg: bool | None):
        self.op, self.rule, self.info, self.session, self.nonneg = op, rule, info, session, nonneg
        self.fold: tuple[torch.Tensor, torch.Tensor, dict] | None = None
        self.y_ref: torch.Tensor | None = None

    def relevance(self, x: torch.Tensor, y: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        op, cache = self.op, self.session.cache
        if self.fold is not None:
            weight, bias, bn = self.fold
            anchors = (op.weight, op.bias, bn["running_mean"], bn["running_var"], bn["weight"], bn["bias"])
            y = self.y_ref
        else:
            weight, bias = op.weight, op.bias
            anchors = (op.weight, op.bias)
        # one entry per layer (the latest rule's): modified copies of large layers do not pile up
        key = ("rule", id(op.weight), self.fold is not None, op.groups)
        prepared = canon.cached(
            cache, key, (*anchors, self.rule.key()), lambda: self.rule.prepare(op, weight, bias)
        )
        result = self.rule.relevance(op, x, y, prepared, relevance, self.nonneg)
        self.session.record(self.info.name, result)
        return result


class _LayerFn(torch.autograd.Function):
    """A linear layer: the ordinary output forward, its LRP rule backward."""

    @staticmethod
    def forward(ctx, x, node):
        y = node.op(x, node.op.weight, node.op.bias)
        ctx.node = node
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, relevance):
        x, y = ctx.saved_tensors
        return ctx.node.relevance(x, y, relevance), None


class _Session:
    """State of one explanation: rule assignment, canonization, per-layer relevance sums."""

    def __init__(
        self,
        model: nn.Module,
        composite: Composite,
        canonize: bool,
        stabilizer: float,
        n_layers: int | None = None,
        zero_bias: bool = False,
    ):
        self.composite, self.canonize, self.stabilizer = composite, canonize, stabilizer
        self.keep_bias = not zero_bias
        self.gradient = False  # rules run as modified gradients (``gradient_domain.py``)
        self.tracker = ModuleTracker(model)
        self.batch: int | None = None
        self.constants: list[torch.Tensor] = []
        self.absorbed: dict[str, torch.Tensor] = {}
        self.gates: dict[int, torch.Tensor] = {}
        self.cache = canon.model_cache(model)
        self.modules: dict[int, tuple[str, nn.Module]] = {}
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and id(w) not in self.modules:
                self.modules[id(w)] = (name or type(module).__name__, module)
        self.n_layers = n_layers
        self.count = 0
        self.kind_count = {"conv": 0, "linear": 0}
        self.names: dict[str, int] = {}
        self.outputs: dict[int, tuple[torch.Tensor, _Node]] = {}
        self.nonneg: dict[int, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor | None] = {}

    def absorb(self, kind: str):
        """A callback adding a rule's absorbed relevance (a tensor, batch or windows first) to ``kind``."""

        def add(r: torch.Tensor) -> None:
            total = r.detach().reshape(self.batch, -1).sum(1)
            self.absorbed[kind] = self.absorbed[kind] + total if kind in self.absorbed else total

        return add

    def constant_leaf(self, t: torch.Tensor) -> torch.Tensor:
        leaf = t.detach().requires_grad_(True)
        self.constants.append(leaf)
        return leaf

    def layer_info(self, op: LinearOp) -> LayerInfo:
        name, module = self.modules.get(id(op.weight), (f"{op.kind}{self.count}", None))
        seen = self.names.get(name, 0)
        self.names[name] = seen + 1
        if seen:
            name = f"{name}#{seen + 1}"  # a reused module's later calls
        depth = self.count / self.n_layers if self.n_layers else None
        info = LayerInfo(name, op.kind, self.count, self.kind_count[op.kind], depth, module)
        self.count += 1
        self.kind_count[op.kind] += 1
        return info

    def is_gate(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.gates.get(id(t)) is t

    def is_nonneg(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.nonneg.get(id(t)) is t

    def mark_nonneg(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            self.nonneg[id(t)] = t
        return t

    def recorder(self, name: str):
        """A callback recording the relevance at the input of layer ``name`` (gradient domain)."""
        return lambda relevance: self.record(name, relevance)

    def record(self, name: str, relevance: torch.Tensor) -> None:
        r = relevance.detach()
        if self.batch is not None and r.dim() > 2 and r.shape[0] != self.batch and r.shape[1] == self.batch:
            r = r.transpose(0, 1)  # sequence-first tokens (nn.MultiheadAttention's L x N x E)
        # windows of a sample are consecutive (Swin: B * windows x tokens x C)
        self.sums[name] = r.reshape(self.batch, -1).sum(1) if self.batch else r.flatten(1).sum(1)


class _RelevanceMode(TorchFunctionMode):
    """Routes the forward's operations to their LRP treatment (see the module docstring)."""

    def __init__(self, session: _Session):
        super().__init__()
        self.s = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        s = self.s
        if func in _LINEAR_FUNCS:
            op = LinearOp(func, args, kwargs)
            info = s.layer_info(op)
            rule = s.composite.rule_for(info)
            if rule is None:
                return func(*args, **kwargs)
            x = first_arg(args, kwargs)
            s.sums[info.name] = None  # keeps the forward order
            if s.gradient:  # epsilon with the bias: the gradient (the sum is recorded on the way)
                return op(gd.ScaleGradFn.apply(x, 1.0, s.recorder(info.name)), op.weight, op.bias)
            node = _Node(op, rule, info, s, True if s.is_nonneg(x) else None)
            y = _LayerFn.apply(x, node)
            s.outputs[id(y)] = (y, node)
            return y
        if func is torch.nn.functional.batch_norm:
            bn = canon.batch_norm_args(args, kwargs)
            x = bn["input"]
            rest = {k: v for k, v in bn.items() if k != "input"}
            if s.gradient:  # folded or not, epsilon on the affine map in eval is its gradient
                self._check_batch_norm(bn)
                return func(*args, **kwargs)
            entry = s.outputs.get(id(x))
            if (
                s.canonize
                and entry is not None
                and entry[0] is x
                and entry[1].fold is None
                and canon.can_fold(bn)
            ):
                node = entry[1]
                weight, bias = canon.folded_parameters(s.cache, node.op.weight, node.op.bias, bn)
                node.fold = (weight, bias, bn)
                out = canon.PassFn.apply(x, lambda t: func(t, **rest))
                node.y_ref = out.detach()
                return out
            return self._batch_norm(func, x, bn, rest)
        relu = is_relu_call(func, args, kwargs)
        if relu or func in ACTIVATION_FUNCS:
            x, fn = first_arg(args, kwargs), activation_fn(func, args, kwargs)
            if not s.gradient:
                out = canon.PassFn.apply(x, fn)
            else:  # ReLU's identity rule is its gradient
                out = fn(x) if relu else gd.IdentityRuleFn.apply(x, fn)
            if func in _GATES:
                s.gates[id(out)] = out
            return s.mark_nonneg(out) if relu else out
        operands = add_operands(func, args, kwargs)
        if operands is not None and _active(operands[0]) and _active(operands[1]):
            if s.gradient:  # the proportional split R_a = a * R / (a + b) is the gradient
                return func(*args, **kwargs)
            if not s.canonize:  # the gradient of a + b hands R to both: it doubles at every block
                self.refuse(
                    "a residual addition needs canonize=True (the gradient would pass its relevance to both branches, doubling it at every block)"
                )
            return canon.SumFn.apply(operands[0], operands[1], s.stabilizer)
        handled = self._modern(func, args, kwargs)
        if handled is not NotImplemented:
            return handled
        if s.gradient:  # pooling, means, constant scaling and shifts: their gradient
            return func(*args, **kwargs)
        if func in _MEAN and _active(first_arg(args, kwargs)):
            rest = args[1:]
            kw = {k: v for k, v in kwargs.items() if k != "input"}
            return canon.NormFn.apply(first_arg(args, kwargs), lambda t: func(t, *rest, **kw), s.stabilizer)
        if func in AVGPOOL_FUNCS:
            rest = args[1:]
            kw = {k: v for k, v in kwargs.items() if k != "input"}
            x = first_arg(args, kwargs)
            out = canon.NormFn.apply(x, lambda t: func(t, *rest, **kw), s.stabilizer)
            return s.mark_nonneg(out) if s.is_nonneg(x) else out
        out = func(*args, **kwargs)
        if args and s.is_nonneg(args[0]):
            if func in _KEEPS_SIGN:
                s.mark_nonneg(out)
            elif out is args[0] or out is None:  # modified in place (x -= 1, x[i] = v): no longer known
                s.nonneg.pop(id(args[0]), None)
        return out

    # -- transformers and modern CNNs (see nonlinear.py, attention.py) -----------------------------
    def refuse(self, what: str) -> None:
        from xai_plugins import InputError

        raise InputError(f"lrp cannot explain {self.s.tracker.current()}: {what}")

    def _call(self, func, *args, **kwargs):
        return self.__torch_function__(func, (), args, kwargs)

    def _check_batch_norm(self, bn) -> None:
        if bn["training"] or bn.get("running_var") is None:
            self.refuse("a batch norm using batch statistics (no running statistics) has no LRP rule")

    def _batch_norm(self, func, x, bn, rest):
        self._check_batch_norm(bn)
        scale = torch.rsqrt(bn["running_var"].detach() + bn["eps"])
        if bn["weight"] is not None:
            scale = scale * bn["weight"].detach()
        scale = scale.view(1, -1, *([1] * (x.dim() - 2)))
        return nl.LinearizedFn.apply(
            x, lambda t: func(t, **rest), nl.ScaleLinear(scale), self.s.stabilizer, self.s.keep_bias
        )

    def _modern(self, func, args, kwargs):
        """The rule of a transformer / modern-CNN operation, or NotImplemented for any other."""
        s = self.s
        if func in _REFUSED:
            self.refuse(_REFUSED[func])
        if func is F.scaled_dot_product_attention and s.gradient:
            fused = attention.fused_sdpa(args, kwargs, s.absorb("softmax"))
            if fused is not None:
                return fused
        if func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward:
            try:
                if func is F.multi_head_attention_forward:
                    return attention.multi_head_attention(self._call, args, kwargs)
                return attention.sdpa(self._call, args, kwargs)
            except attention.Unsupported as exc:
                self.refuse(str(exc))
        if func in (torch.cat, torch.concat) and not kwargs.get("out"):
            parts = list(first_arg(args, kwargs, "tensors"))
            if any(_active(t) for t in parts) and not all(_active(t) for t in parts):
                # constant parts (class / register tokens): leaves, so their relevance is measured
                parts = [
                    t
                    if _active(t) or not isinstance(t, torch.Tensor) or not t.is_floating_point()
                    else s.constant_leaf(t)
                    for t in parts
                ]
                rest = {k: v for k, v in kwargs.items() if k != "tensors"}
                return func(parts, *args[1:], **rest)
            return NotImplemented
        if func in _SOFTMAX:
            x = first_arg(args, kwargs)
            dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
            if not _active(x):
                return func(*args, **kwargs)
            softmax = gd.SoftmaxGradFn if s.gradient else nl.SoftmaxFn
            return softmax.apply(x, dim, kwargs.get("dtype"), s.absorb("softmax"))
        if func is F.layer_norm or (func is _RMS_NORM and func is not None):
            x = first_arg(args, kwargs)
            names = (
                ("input", "normalized_shape", "weight", "bias", "eps")
                if func is F.layer_norm
                else ("input", "normalized_shape", "weight", "eps")
            )
            a = dict(zip(names, args))
            a.update(kwargs)
            if not _active(x):
                return func(*args, **kwargs)
            eps = (
                a.get("eps")
                if a.get("eps") is not None
                else (1e-5 if func is F.layer_norm else torch.finfo(x.dtype).eps)
            )
            if s.gradient and func is F.layer_norm:
                return gd.layer_norm(x, list(a["normalized_shape"]), a.get("weight"), a.get("bias"), eps)
            lin = nl.NormLinear(
                x, len(tuple(a["normalized_shape"])), a.get("weight"), eps, func is F.layer_norm
            )
            rest = {k: v for k, v in a.items() if k != "input"}
            if s.gradient:
                return gd.NormGradFn.apply(x, lambda t: (func(t, **rest), lin))
            keep = s.keep_bias or a.get("bias") is None
            return nl.LinearizedFn.apply(x, lambda t: func(t, **rest), lin, s.stabilizer, keep)
        if func in _MATMUL or func in _MUL or func in _DIV or func in _ADD_SUB:
            if "out" in kwargs or len(args) + len(kwargs) != 2:
                return NotImplemented
            a = args[0]
            b = args[1] if len(args) > 1 else next(iter(kwargs.values()))
            act_a, act_b = _active(a), _active(b)
            if not (act_a or act_b):
                return NotImplemented
            if func in _MATMUL:
                if act_a and act_b:
                    if s.gradient:
                        return torch.matmul(gd.half(a), gd.half(b))
                    return nl.BilinearFn.apply(a, b, torch.matmul, s.stabilizer)
                return NotImplemented  # x @ W with a constant W: autograd (as F.linear without a rule)
            if func in _MUL:
                if act_a and act_b:
                    if s.is_gate(b) or s.is_gate(a):
                        main, gate = (a, b) if s.is_gate(b) else (b, a)
                    elif a.shape == b.shape:
                        if s.gradient:
                            return torch.mul(gd.half(a), gd.half(b))
                        return nl.BilinearFn.apply(a, b, torch.mul, s.stabilizer)
                    else:
                        main, gate = (a, b) if a.numel() >= b.numel() else (b, a)
                    if s.gradient:
                        return torch.mul(main, gate.detach())
                    return nl.GateFn.apply(main, gate)  # squeeze-excitation: the gate is a constant factor
                if s.gradient:
                    return NotImplemented
                x, c = (a, b) if act_a else (b, a)
                return canon.PassFn.apply(x, lambda t: torch.mul(t, c))  # layer scale, attention scale
            if s.gradient:  # a constant factor, divisor or shift: the gradient
                return NotImplemented
            if func in _DIV:
                if act_a and not act_b:
                    return canon.PassFn.apply(a, lambda t: torch.div(t, b))
                return NotImplemented
            sign = _ADD_SUB[func]
            if act_a and act_b:
                return NotImplemented  # same-shaped residual additions were handled above
            x, c, slope = (a, b, 1.0) if act_a else (b, a, sign)
            combine = torch.sub if sign < 0 else torch.add

            def op(t: torch.Tensor) -> torch.Tensor:  # out of place, also for add_ / sub_
                return combine(t, c) if act_a else combine(c, t)

            if not s.keep_bias and slope > 0:  # zero_bias: the constant takes no share
                return canon.PassFn.apply(x, op)
            return nl.LinearizedFn.apply(x, op, nl.ScaleLinear(slope), s.stabilizer, s.keep_bias)
        return NotImplemented


class _CountMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _LINEAR_FUNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_layers(model: nn.Module, example: torch.Tensor) -> int:
    """Number of linear-layer calls in one forward (for depth-based composites); once per input
    shape and set of parameters in a session of the model."""

    def count() -> int:
        with torch.no_grad(), _CountMode() as mode:
            model(example[:1])
        return mode.count

    key = ("lrp.n_layers", tuple(example.shape[1:]), tuple(id(p) for p in model.parameters()))
    return structural(model, key, count)


def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    composite: Composite,
    canonize: bool = True,
    stabilizer: float = 1e-6,
    zero_bias: bool = False,
    gradient: bool | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Input relevance (B x C x H x W) for each sample's target logit, and per-layer relevance sums.

    ``gradient``: None (the default) runs the rules as modified gradients (``gradient_domain.py``)
    where that gives the same relevance (``gradient_domain_applies``); False carries the relevance
    explicitly through every operation.

    ``extras["layer_relevance"]``: ``{"output": R at the logit (= S_c), <layer>: sum of the relevance
    at that layer's input, ...}`` in forward order, each a B tensor; with LRP-0/epsilon and no bias
    every entry equals the logit (conservation, Eq. 11).
    """
    x = inputs.detach().clone().requires_grad_(True)
    with eval_mode(model), frozen_parameters(model):
        n_layers = count_layers(model, x) if composite.needs_depth else None
        session = _Session(model, composite, canonize, stabilizer, n_layers, zero_bias)
        session.batch = x.shape[0]
        session.gradient = gradient is not False and gradient_domain_applies(
            composite, canonize, stabilizer, zero_bias
        )
        with torch.enable_grad():
            with session.tracker, _RelevanceMode(session):
                logits = model(x)
            session.outputs.clear()
            session.nonneg.clear()
            session.gates.clear()
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("LRP needs a model returning B x classes logits")
            index = targets.to(logits.device).long().view(-1, 1)
            score = logits.detach().gather(1, index)
            # Eq. 11: R_out = S_c(x); in the gradient domain g = 1 there, and R = x * g throughout
            seed = torch.zeros_like(logits).scatter_(1, index, 1.0 if session.gradient else score)
            leaves = [c for c in session.constants if c.shape[0] in (1, x.shape[0])]
            relevance, *absorbed = torch.autograd.grad(logits, [x, *leaves], seed, allow_unused=True)
            if session.gradient:
                relevance = relevance * x
                absorbed = [None if g is None else g * leaf for g, leaf in zip(absorbed, leaves)]
    sums = {"output": score.squeeze(1)}
    sums.update({k: v for k, v in session.sums.items() if v is not None})
    constant = torch.zeros_like(score.squeeze(1))
    for r in absorbed:
        if r is not None:
            constant = constant + r.detach().reshape(r.shape[0], -1).sum(1)
    taken = {"constants": constant, **session.absorbed}
    return relevance.detach(), {"layer_relevance": sums, "absorbed_relevance": taken}


_KNOWN_RULES = RULES + ("lrp_0",)


def gradient_domain_applies(composite: Composite, canonize: bool, stabilizer: float, zero_bias: bool) -> bool:
    """Whether the run is gradient x input (``gradient_domain.py``): a composite that asks for it
    (``attn_lrp``), every linear layer's rule LRP-0 / epsilon <= 1e-6 with the bias (taken as its
    limit, as LXT computes AttnLRP), canonized residual sums, and a vanishing stabilizer for the
    sums, norms and products. The two domains differ only where a layer's output is within ~1e-5
    of zero; the gradient domain is also the more precise in float32 (its float32 maps were
    within 2e-6 of float64 on the tiny test architectures, the explicit ones within 2e-4)."""
    rules = composite.rules()
    return (
        composite.gradient_domain
        and canonize
        and not zero_bias
        and stabilizer <= 1e-6
        and bool(rules)
        and all(r.is_gradient for r in rules)
    )


def check_config(config: dict[str, Any]) -> None:
    from xai_plugins import InputError

    rule, composite = config.get("rule"), config.get("composite")
    if rule is not None and composite is not None:
        raise InputError("give either rule= or composite= to lrp, not both")
    if rule is not None and not isinstance(rule, Rule) and str(rule) not in _KNOWN_RULES:
        raise InputError(f"unknown LRP rule {rule!r}; known: {', '.join(_KNOWN_RULES)}")
    if composite is not None and not isinstance(composite, Composite) and str(composite) not in COMPOSITES:
        raise InputError(f"unknown LRP composite {composite!r}; known: {', '.join(COMPOSITES)}")
    if rule == "alpha_beta":
        alpha, beta = float(config.get("alpha", 2.0)), float(config.get("beta", 1.0))
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-9:
            raise InputError(
                f"alpha-beta needs alpha = beta + 1 (review Eq. 15), got alpha={alpha}, beta={beta}"
            )


def composite_for(config: dict[str, Any]) -> Composite:
    check_config(config)
    rule, composite = config.get("rule"), config.get("composite")
    if rule is None and composite is None:
        composite = "epsilon_gamma_box"
    return make_composite(rule, composite, config)
