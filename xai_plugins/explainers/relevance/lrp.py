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
(folded batch norms, W^+ stacks, ...) are cached per model and refreshed when the weights change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import canonizers as canon
from .composites import COMPOSITES, Composite, LayerInfo, make_composite
from .ops import (
    ACTIVATION_FUNCS,
    AVGPOOL_FUNCS,
    CONV_FUNCS,
    MAXPOOL_FUNCS,
    LinearOp,
    activation_fn,
    add_operands,
    first_arg,
    is_relu_call,
    version_key,
)
from .rules import RULES, Rule

_LINEAR_FUNCS = frozenset({*CONV_FUNCS, torch.nn.functional.linear})
# operations whose output is non-negative when their input is (tracked so that rules can skip the
# a^- terms without looking at the data)
_KEEPS_SIGN = frozenset({*MAXPOOL_FUNCS, *AVGPOOL_FUNCS, torch.flatten, torch.Tensor.flatten, torch.Tensor.view,
                         torch.Tensor.reshape, torch.reshape, torch.Tensor.contiguous,
                         torch.nn.functional.dropout, torch.nn.functional.adaptive_max_pool2d})


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
            versions = version_key(op.weight, op.bias, bn["running_mean"], bn["running_var"], bn["weight"],
                                   bn["bias"])
            y = self.y_ref
        else:
            weight, bias = op.weight, op.bias
            versions = version_key(op.weight, op.bias)
        # one entry per layer (the latest rule's): modified copies of large layers do not pile up
        key = ("rule", id(op.weight), self.fold is not None, op.groups)
        prepared = canon.cached(cache, key, versions + (self.rule.key(),),
                                lambda: self.rule.prepare(op, weight, bias))
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

    def __init__(self, model: nn.Module, composite: Composite, canonize: bool, stabilizer: float,
                 n_layers: int | None = None):
        self.composite, self.canonize, self.stabilizer = composite, canonize, stabilizer
        self.cache = canon.checked_model_cache(model)
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

    def is_nonneg(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.nonneg.get(id(t)) is t

    def mark_nonneg(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            self.nonneg[id(t)] = t
        return t

    def record(self, name: str, relevance: torch.Tensor) -> None:
        self.sums[name] = relevance.detach().flatten(1).sum(1)


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
            node = _Node(op, rule, info, s, True if s.is_nonneg(x) else None)
            s.sums[info.name] = None  # keeps the forward order
            y = _LayerFn.apply(x, node)
            s.outputs[id(y)] = (y, node)
            return y
        if func is torch.nn.functional.batch_norm:
            bn = canon.batch_norm_args(args, kwargs)
            x = bn["input"]
            rest = {k: v for k, v in bn.items() if k != "input"}
            entry = s.outputs.get(id(x))
            if s.canonize and entry is not None and entry[0] is x and entry[1].fold is None and canon.can_fold(bn):
                node = entry[1]
                weight, bias = canon.folded_parameters(s.cache, node.op.weight, node.op.bias, bn)
                node.fold = (weight, bias, bn)
                out = canon.PassFn.apply(x, lambda t: func(t, **rest))
                node.y_ref = out.detach()
                return out
            return canon.PassFn.apply(x, lambda t: func(t, **rest))
        relu = is_relu_call(func, args, kwargs)
        if relu or func in ACTIVATION_FUNCS:
            out = canon.PassFn.apply(first_arg(args, kwargs), activation_fn(func, args, kwargs))
            return s.mark_nonneg(out) if relu else out
        if s.canonize:
            operands = add_operands(func, args, kwargs)
            if operands is not None:
                return canon.SumFn.apply(operands[0], operands[1], s.stabilizer)
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


class _CountMode(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _LINEAR_FUNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_layers(model: nn.Module, example: torch.Tensor) -> int:
    """Number of linear-layer calls in one forward (for depth-based composites); cached."""
    cache = canon.model_cache(model)
    key = ("n_layers", tuple(example.shape[1:]), tuple(id(p) for p in model.parameters()))
    if key not in cache:
        with torch.no_grad(), _CountMode() as mode:
            model(example[:1])
        cache[key] = mode.count
    return cache[key]


def lrp(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, composite: Composite,
        canonize: bool = True, stabilizer: float = 1e-6) -> tuple[torch.Tensor, dict[str, Any]]:
    """Input relevance (B x C x H x W) for each sample's target logit, and per-layer relevance sums.

    ``extras["layer_relevance"]``: ``{"output": R at the logit (= S_c), <layer>: sum of the relevance
    at that layer's input, ...}`` in forward order, each a B tensor; with LRP-0/epsilon and no bias
    every entry equals the logit (conservation, Eq. 11).
    """
    x = inputs.detach().clone().requires_grad_(True)
    with eval_mode(model):
        n_layers = count_layers(model, x) if composite.needs_depth else None
        session = _Session(model, composite, canonize, stabilizer, n_layers)
        with torch.enable_grad():
            with _RelevanceMode(session):
                logits = model(x)
            session.outputs.clear()
            session.nonneg.clear()
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("LRP needs a model returning B x classes logits")
            index = targets.to(logits.device).long().view(-1, 1)
            score = logits.detach().gather(1, index)
            seed = torch.zeros_like(logits).scatter_(1, index, score)  # Eq. 11: R_out = S_c(x)
            (relevance,) = torch.autograd.grad(logits, x, seed)
    sums = {"output": score.squeeze(1)}
    sums.update({k: v for k, v in session.sums.items() if v is not None})
    return relevance.detach(), {"layer_relevance": sums}


_KNOWN_RULES = RULES + ("lrp_0",)


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
            raise InputError(f"alpha-beta needs alpha = beta + 1 (review Eq. 15), got alpha={alpha}, beta={beta}")


def composite_for(config: dict[str, Any]) -> Composite:
    check_config(config)
    rule, composite = config.get("rule"), config.get("composite")
    if rule is None and composite is None:
        composite = "epsilon_gamma_box"
    return make_composite(rule, composite, config)
