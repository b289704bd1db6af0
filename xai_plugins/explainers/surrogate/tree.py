"""Frosst & Hinton's soft binary decision tree (2017): sigmoid inner nodes, softmax leaves.

Nodes are numbered breadth-first: node i has children 2i + 1 (left) and 2i + 2 (right); leaf l (0-based,
left to right) is node 2^depth - 1 + l. p_i(x) = sigmoid(beta (w_i . x + b_i)) is the probability of
going right at node i (the review's Eq. 1)."""

from __future__ import annotations

import torch
from torch import nn


class SoftTree(nn.Module):
    def __init__(self, in_features: int, num_classes: int, depth: int):
        super().__init__()
        self.depth = depth
        self.inner = nn.Linear(in_features, 2**depth - 1)
        self.log_beta = nn.Parameter(torch.zeros(()))
        self.leaves = nn.Parameter(0.1 * torch.randn(2**depth, num_classes))

    def decisions(self, features: torch.Tensor) -> torch.Tensor:
        """B x inner-nodes probabilities of going right."""
        return torch.sigmoid(self.log_beta.exp() * self.inner(features))

    def reach(self, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x inner-nodes probability of reaching each inner node, B x leaves path probabilities P^l)."""
        probs = right.new_ones(right.shape[0], 1)
        inner = []
        for level in range(self.depth):
            start = 2**level - 1
            p = right[:, start : start + 2**level]
            inner.append(probs)
            probs = torch.stack([probs * (1 - p), probs * p], dim=2).flatten(1)
        return torch.cat(inner, dim=1), probs

    def leaf_distributions(self) -> torch.Tensor:
        """Q^l: leaves x classes."""
        return self.leaves.softmax(dim=1)

    def loss(self, features: torch.Tensor, soft_targets: torch.Tensor, penalty: float) -> torch.Tensor:
        """Frosst & Hinton's Eq. 1 read as the expected cross-entropy over leaves,
        -sum_l P^l(x) sum_k T_k log Q^l_k, plus the balancing penalty (their section 3)
        C = -penalty sum_i 2^-d(i) (log alpha_i + log(1 - alpha_i)) / 2,
        alpha_i = sum_x P^i(x) p_i(x) / sum_x P^i(x)."""
        right = self.decisions(features)
        reach_inner, reach_leaves = self.reach(right)
        log_q = self.leaves.log_softmax(dim=1)
        ce = -(reach_leaves * (soft_targets @ log_q.T)).sum(1).mean()
        alpha = (reach_inner * right).sum(0) / reach_inner.sum(0).clamp_min(1e-12)
        alpha = alpha.clamp(1e-6, 1 - 1e-6)
        levels = torch.floor(
            torch.log2(torch.arange(1, right.shape[1] + 1, dtype=right.dtype, device=right.device))
        )
        balance = -(0.5 * (alpha.log() + (1 - alpha).log()) * 2.0**-levels).sum()
        return ce + penalty * balance

    def most_probable(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per input: the most probable leaf, its path (inner nodes root to leaf), the directions taken
        (1 = right), the path probability, and the tree's prediction (argmax of that leaf's Q)."""
        right = self.decisions(features)
        _, reach_leaves = self.reach(right)
        prob, leaf = reach_leaves.max(dim=1)
        node = leaf + 2**self.depth - 1
        nodes, dirs = [], []
        for _ in range(self.depth):
            parent = (node - 1) // 2
            dirs.append((node == 2 * parent + 2).long())
            nodes.append(parent)
            node = parent
        return {
            "leaf": leaf,
            "path": torch.stack(nodes[::-1], 1),
            "directions": torch.stack(dirs[::-1], 1),
            "path_probability": prob,
            "right": right,
            "prediction": self.leaf_distributions()[leaf].argmax(1),
        }
