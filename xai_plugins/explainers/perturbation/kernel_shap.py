"""Kernel SHAP on superpixels (Lundberg & Lee 2017)."""

from __future__ import annotations

import math

import torch

from .segments import paint
from .surrogate_base import SuperpixelSurrogate


def shapley_kernel(m: int, size: torch.Tensor) -> torch.Tensor:
    """pi(z) = (M - 1) / (C(M, |z|) |z| (M - |z|)) (Lundberg & Lee 2017, Theorem 2)."""
    binom = torch.tensor([math.comb(m, int(s)) for s in size], dtype=torch.float64)
    return (m - 1) / (binom * size * (m - size))


def all_coalitions(m: int) -> torch.Tensor:
    """Every coalition except the empty and the full one: (2^M - 2) x M."""
    codes = torch.arange(1, 2**m - 1).unsqueeze(1)
    return ((codes >> torch.arange(m)) & 1).float()


def sampled_coalitions(m: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` coalitions drawn from the Shapley kernel (size k with probability proportional to
    (M - 1) / (k (M - k)), then a uniform subset of that size), in complementary pairs."""
    sizes = torch.arange(1, m, dtype=torch.float64)
    half = (count + 1) // 2
    k = torch.multinomial((m - 1) / (sizes * (m - sizes)), half, replacement=True, generator=gen) + 1
    ranks = torch.rand(half, m, generator=gen).argsort(dim=1).argsort(dim=1)
    z = (ranks < k.unsqueeze(1)).float()
    return torch.cat([z, 1.0 - z])[:count]


class KernelShap(SuperpixelSurrogate):
    """Kernel SHAP (Lundberg & Lee 2017, Eq. 8-9, Theorem 2): the Shapley values of the superpixels as
    the weighted least-squares fit g(z) = phi_0 + sum_j phi_j z_j with the Shapley kernel pi(z), under
    phi_0 = f(baseline) and sum_j phi_j = f(x) - f(baseline) (efficiency, imposed exactly by eliminating
    the last coefficient, as the shap package does).

    When 2^M - 2 <= ``samples`` every coalition is enumerated with its exact kernel weight, so the values
    are the exact Shapley values of the superpixel game; otherwise ``samples`` coalitions are drawn from
    the kernel in complementary pairs (equal weights). Captum's ``KernelShap`` samples too but fits an
    unconstrained regression, so its values satisfy efficiency only approximately.

    ``attributions`` spread each superpixel's value evenly over its pixels (phi_j / |S_j|), so they sum
    to f(x) - f(baseline); ``extras["values"]`` holds the per-superpixel phi_j and ``extras["segments"]``
    the superpixels. Scores are the target's logit by default.
    """

    name = "kernel_shap"
    params = {**SuperpixelSurrogate.params, "segments": 25, "samples": 1024}

    def coalitions(self, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if count < 2:
            return torch.ones(1, count), torch.zeros(1)
        if 2**count - 2 <= self.config["samples"]:
            z = all_coalitions(count)
            return z, shapley_kernel(count, z.sum(1).double()).float()
        z = sampled_coalitions(count, int(self.config["samples"]), gen)
        return z, torch.ones(z.shape[0])

    def solve(self, z, weights, y, full, empty) -> torch.Tensor:
        m = z.shape[1]
        total = full - empty
        if m == 1:
            return total.view(1)
        last = z[:, -1:]
        x = z[:, :-1] - last
        target = y - empty - last[:, 0] * total
        gram = x.T @ (weights.unsqueeze(1) * x) + 1e-10 * torch.eye(m - 1, dtype=x.dtype)
        head = torch.linalg.solve(gram, x.T @ (weights * target))
        return torch.cat([head, (total - head.sum()).view(1)])

    def spread(self, values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        sizes = torch.zeros_like(values).scatter_add_(
            1, segments.flatten(1), torch.ones_like(segments.flatten(1), dtype=values.dtype)
        )
        return paint(values / sizes.clamp_min(1), segments)
