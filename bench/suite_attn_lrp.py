"""AttnLRP (``lrp`` with ``composite="attn_lrp"``) against LXT 2.1 on ViTs (issue 17).

Run on a ViT-B/16-shaped model: ``python -m bench --models vit_b_16 --size 224 --batch 8 --suites
attn_lrp``. LXT is measured at its best: its rules patched into a copy of the model once (not per
call), each timed call one forward and one input-gradient backward (gradient x input). LXT 2.1 ships a
torchvision-ViT map only for CP-LRP, so the AttnLRP map is built from LXT's own rules (see
``lxt_attn_lrp``), which ``tests/test_relevance_modern.py`` also uses as its oracle. Note: LXT's
README states that LRP is patented for commercial use; the project uses LXT only as a test/bench
oracle. Models other than torchvision/timm ViTs give no rows.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.harness import Case, quiet
from core.api import explain


def lxt_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """LXT 2.1's ``lxt.efficient.rules`` and ``.patches``, loaded by file: the package's ``__init__``
    imports its patches for Hugging Face models, which fail on transformers 5
    (``transformers.modeling_attn_mask_utils`` is gone); the two modules need only torch."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lxt (pip install lxt==2.1) is not installed")
    root = list(spec.submodule_search_locations)[0]
    loaded = []
    for name in ("rules", "patches"):
        full = f"lxt.efficient.{name}"
        if full not in sys.modules:
            if "lxt.efficient" not in sys.modules:
                package = types.ModuleType("lxt.efficient")
                package.__path__ = [f"{root}/efficient"]
                sys.modules["lxt.efficient"] = package
            mspec = importlib.util.spec_from_file_location(full, f"{root}/efficient/{name}.py")
            module = importlib.util.module_from_spec(mspec)
            sys.modules[full] = module
            mspec.loader.exec_module(module)
        loaded.append(sys.modules[full])
    return loaded[0], loaded[1]


def lxt_attn_lrp(model: nn.Module) -> nn.Module:
    """A copy of a torchvision or timm ViT with LXT's AttnLRP rules: ``layer_norm_forward`` (std
    detached) on LayerNorms, ``identity_rule_implicit`` on GELU, ``divide_gradient`` on q, k (1/4)
    and v (1/2) around the attention (LXT's ``wrap_attention_forward``). Gradient x input of its
    target logit is LXT's AttnLRP relevance."""
    rules, patches = lxt_modules()
    divide = rules.divide_gradient
    twin = copy.deepcopy(model).eval()

    def attention(q, k, v):
        return F.scaled_dot_product_attention(divide(q, 4), divide(k, 4), divide(v, 2))

    def mha(self, q, k, v, need_weights=False, **_):
        n, length, e = q.shape
        qkv = F.linear(q, self.in_proj_weight, self.in_proj_bias).view(n, length, 3, self.num_heads, -1)
        out = attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
        return self.out_proj(out.transpose(1, 2).reshape(n, length, e)), None

    def timm_attention(self, t, attn_mask=None, **_):
        b, n, c = t.shape
        qkv = self.qkv(t).reshape(b, n, 3, self.num_heads, self.head_dim)
        out = attention(*qkv.permute(2, 0, 3, 1, 4).unbind(0))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    for m in twin.modules():
        if isinstance(m, nn.LayerNorm):
            m.forward = types.MethodType(patches.layer_norm_forward, m)
        elif isinstance(m, nn.GELU):
            m.forward = (lambda orig: lambda t: rules.identity_rule_implicit(orig, t))(m.forward)
        elif isinstance(m, nn.MultiheadAttention):
            m.forward = types.MethodType(mha, m)
        elif type(m).__name__ == "Attention" and hasattr(m, "qkv"):
            m.forward = types.MethodType(timm_attention, m)
    return twin


def lxt_relevance(twin: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    xg = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(twin(xg).gather(1, targets.view(-1, 1)).sum(), xg)
    return (xg * grad).detach()


def _is_vit(model: nn.Module) -> bool:
    return type(model).__name__ == "VisionTransformer"


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    if not _is_vit(model):
        return []
    twin = lxt_attn_lrp(model)

    def ours() -> Any:
        return explain(model, inputs, targets, method="lrp", composite="attn_lrp", progress=False)

    return [
        Case(
            "lrp(attn_lrp)",
            ours,
            "lxt.AttnLRP",
            quiet(lambda: lxt_relevance(twin, inputs, targets)),
            note="LXT rules patched once",
        )
    ]
