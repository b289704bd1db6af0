"""Drawing a soft decision tree: node images at their place in the tree, leaves as class bar charts."""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

from xai_plugins.toolkit import overlay


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def filter_images(weights: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Input-space node filters (nodes x D) as nodes x 1 x 3 x H x W images, 0.5 = zero weight."""
    w = weights.view(weights.shape[0], *shape)
    w = 0.5 + w / (2 * w.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1))
    if w.shape[1] != 3:
        w = w[:, :1].expand(-1, 3, -1, -1)
    return to_uint8(w).unsqueeze(1)


def prototype_images(
    images: torch.Tensor, contributions: torch.Tensor, reach: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """For each node, the image sent most surely left and the one sent most surely right, each overlaid
    with the node's evidence for that side (the negative / positive part of its contribution map):
    nodes x 2 x 3 x H x W. ``images`` in [0, 1]; ``contributions`` B x nodes x h x w."""
    panels = []
    size = images.shape[-2:]
    for i in range(right.shape[1]):
        row = []
        for side, score in ((-1, reach[:, i] * (1 - right[:, i])), (1, reach[:, i] * right[:, i])):
            b = int(score.argmax())
            heat = (side * contributions[b, i]).clamp(min=0)
            heat = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            heat = heat / heat.max().clamp_min(1e-12)
            row.append(torch.from_numpy(overlay(images[b], heat, alpha=0.45)).permute(2, 0, 1).float())
        panels.append(torch.stack(row))
    return to_uint8(torch.stack(panels))


def draw_tree(
    node_images: torch.Tensor, leaves: torch.Tensor, title: str, class_names: list[str] | None = None
) -> bytes:
    """PNG of the tree: inner nodes show their images (left | right panels), leaves their Q^l."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_leaves, n_classes = leaves.shape
    depth = int(np.log2(n_leaves))
    names = class_names or [str(k) for k in range(n_classes)]
    fig = plt.figure(figsize=(max(6.0, 1.1 * n_leaves), 1.6 * (depth + 1) + 0.6), dpi=90)
    canvas = fig.add_axes((0, 0, 1, 1))
    canvas.set_xlim(0, n_leaves)
    canvas.set_ylim(-0.2, depth + 1.0)
    canvas.axis("off")
    canvas.text(n_leaves / 2, depth + 0.85, title, ha="center", va="center", fontsize=10)

    def centre(node: int) -> tuple[float, float]:
        level = int(np.floor(np.log2(node + 1)))
        index = node - (2**level - 1)
        span = n_leaves / 2**level
        return (index + 0.5) * span, depth - level + 0.35

    for node in range(n_leaves - 1):
        x, y = centre(node)
        for child in (2 * node + 1, 2 * node + 2):
            cx, cy = centre(child)
            canvas.plot([x, cx], [y, cy], color="0.6", lw=0.8, zorder=0)
        img = node_images[node].permute(0, 2, 3, 1).numpy()
        strip = np.concatenate(list(img), axis=1)
        w = min(0.9, 0.45 * img.shape[0]) * min(1.0, n_leaves / 2 ** int(np.floor(np.log2(node + 1))) / 1.1)
        h = 0.7
        ax = fig.add_axes(
            ((x - w / 2) / n_leaves, (y - h / 2 + 0.2) / (depth + 1.2), w / n_leaves, h / (depth + 1.2))
        )
        ax.imshow(strip, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"node {node}" + (": left | right" if img.shape[0] == 2 else ""), fontsize=7, pad=1)
    for leaf in range(n_leaves):
        x, y = centre(n_leaves - 1 + leaf)
        ax = fig.add_axes(
            ((x - 0.4) / n_leaves, (y - 0.3 + 0.2) / (depth + 1.2), 0.8 / n_leaves, 0.6 / (depth + 1.2))
        )
        q = leaves[leaf].numpy()
        colors = ["C3" if k == q.argmax() else "C0" for k in range(n_classes)]
        ax.bar(range(n_classes), q, color=colors)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(n_classes))
        ax.set_xticklabels([n[:4] for n in names], fontsize=5, rotation=90)
        ax.set_yticks([])
        ax.set_title(f"leaf {leaf}: {names[int(q.argmax())]}", fontsize=6, pad=1)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
