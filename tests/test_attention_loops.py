"""attention_rollout and transformer_attribution = a literal loop over the papers' equations.

The loops below are plain Python over lists of floats, from attention probabilities captured here
independently of the explainers (timm ``Attention`` with ``fused_attn`` off: the output of
``attn_drop``, an identity in eval mode). Rollout: Abnar & Zuidema 2020, section 3 (heads fused,
A = 0.5 W + 0.5 I with rows renormalized, R = A_L ... A_1; discard ratio as jacobgil's vit-explain).
Transformer attribution: the gradient x attention form (Chefer et al., ICCV 2021, Eq. 5-6, which the
CVPR 2021 Eq. 13-14 reduce to with the attention map in place of its LRP relevance):
Abar = E_h[(dy_t/dA * A)^+], R <- R + Abar R from R = I. torchvision's nn.MultiheadAttention runs
the fused path and exposes no probabilities; the explainers recompute it explicitly, which is
checked to leave the logits unchanged, and its loops read the recomputed maps.
"""

from __future__ import annotations

import pytest
import torch
from tiny_architectures import build

from core.api import explain
from xai_plugins.explainers.transformer.attention import attention_maps
from xai_plugins.explainers.transformer.chefer import TransformerAttribution
from xai_plugins.explainers.transformer.rollout import AttentionRollout

timm = pytest.importorskip("timm")
GRID = 4  # 32 px, patch 8


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def timm_probabilities(model, x: torch.Tensor, grad: bool = False):
    """(logits, [B x heads x N x N per block]) captured from ``attn_drop`` with fused attention off."""
    maps, handles = [], []
    for block in model.blocks:
        block.attn.fused_attn = False
        handles.append(block.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out)))
    try:
        with torch.set_grad_enabled(grad):
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return logits, maps


def matmul(a: list, b: list) -> list:
    n = len(a)
    return [[sum(a[i][k] * b[k][j] for k in range(n)) for j in range(n)] for i in range(n)]


def class_row_on_grid(r: list, prefix: int) -> torch.Tensor:
    return torch.tensor(r[0][prefix:]).view(1, GRID, GRID)


def rollout_loop(maps: list[torch.Tensor], b: int, fusion: str, ratio: float, prefix: int) -> torch.Tensor:
    fuse = {"mean": lambda v: sum(v) / len(v), "max": max, "min": min}[fusion]
    r = None
    for attn in maps:
        a = attn[b].tolist()  # heads x N x N
        n = len(a[0])
        w = [[fuse([a[h][i][j] for h in range(len(a))]) for j in range(n)] for i in range(n)]
        drop = int(n * n * ratio)
        for _, i, j in sorted((w[i][j], i, j) for i in range(n) for j in range(n))[:drop]:
            w[i][j] = 0.0
        step = [[0.5 * w[i][j] + 0.5 * (i == j) for j in range(n)] for i in range(n)]
        step = [[v / sum(row) for v in row] for row in step]
        r = step if r is None else matmul(step, r)
    return class_row_on_grid(r, prefix)


def chefer_loop(maps: list[torch.Tensor], grads: list[torch.Tensor], b: int, prefix: int) -> torch.Tensor:
    n = maps[0].shape[-1]
    r = [[float(i == j) for j in range(n)] for i in range(n)]
    for attn, grad in zip(maps, grads):
        a, g = attn[b].tolist(), grad[b].tolist()
        heads = len(a)
        cam = [
            [sum(max(0.0, g[h][i][j] * a[h][i][j]) for h in range(heads)) / heads for j in range(n)]
            for i in range(n)
        ]
        update = matmul(cam, r)
        r = [[r[i][j] + update[i][j] for j in range(n)] for i in range(n)]
    return class_row_on_grid(r, prefix)


@pytest.mark.parametrize("arch,prefix", [("timm_vit", 1), ("timm_deit", 2)])
@pytest.mark.parametrize(
    "fusion,ratio", [("mean", 0.0), ("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)]
)
def test_rollout_is_the_loop(arch, prefix, fusion, ratio):
    model, x = build(arch), _x()
    _, maps = timm_probabilities(model, x)
    got = AttentionRollout(head_fusion=fusion, discard_ratio=ratio).explain(model, x, None)
    for b in range(x.shape[0]):
        expected = rollout_loop(maps, b, fusion, ratio, prefix)
        assert torch.allclose(got[b], expected, rtol=1e-4, atol=1e-6), (fusion, ratio)
    if ratio == 0:  # a distribution over all tokens: the patches share it with the prefix tokens
        assert torch.all(got.flatten(1).sum(1) < 1)


@pytest.mark.parametrize("arch,prefix", [("timm_vit", 1), ("timm_deit", 2)])
def test_transformer_attribution_is_the_loop(arch, prefix):
    model, x = build(arch), _x()
    logits, maps = timm_probabilities(model, x, grad=True)
    targets = logits.argmax(1)
    grads = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), maps)
    got = TransformerAttribution().explain(model, x, targets)
    for b in range(x.shape[0]):
        assert torch.allclose(got[b], chefer_loop(maps, grads, b, prefix), rtol=1e-4, atol=1e-6)
    other = TransformerAttribution().explain(model, x, (targets + 1) % 5)
    assert not torch.allclose(got, other)  # class-specific, unlike rollout


def test_torchvision_recompute_keeps_the_logits_and_feeds_the_loops():
    model, x = build("tv_vit"), _x()
    with torch.no_grad():
        plain = model(x)
        with attention_maps(model, "test") as maps:
            recomputed = model(x)
    assert len(maps) == 2 and maps[0].shape == (2, 2, 17, 17)
    assert torch.allclose(plain, recomputed, rtol=1e-5, atol=1e-5)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 2, 17))
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed
    got = AttentionRollout(head_fusion="max", discard_ratio=0.2).explain(model, x, None)
    for b in range(2):
        assert torch.allclose(got[b], rollout_loop(maps, b, "max", 0.2, 1), rtol=1e-4, atol=1e-6)
    xg = x.clone().requires_grad_()
    with attention_maps(model, "test") as maps:
        logits = model(xg)
    targets = logits.argmax(1)
    grads = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), maps)
    got = TransformerAttribution().explain(model, x, targets)
    for b in range(2):
        assert torch.allclose(got[b], chefer_loop(maps, grads, b, 1), rtol=1e-4, atol=1e-6)


def test_explain_upsamples_the_token_map():
    model, x = build("timm_vit"), _x()
    exp = explain(model, x, method="attention_rollout", progress=False)
    token_map = AttentionRollout().explain(model, x, None)
    assert exp.attributions.shape == (2, 1, 32, 32)
    assert torch.allclose(exp.attributions.mean(dim=(2, 3)), token_map.mean(dim=(2, 3)), rtol=1e-3)
