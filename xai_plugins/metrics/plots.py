"""Figures of the evaluation metrics as PNG bytes: curves and grids of maps (matplotlib, Agg).

Used by the sanity checks (randomization curves, the per-layer grid of randomized maps) and by
faithfulness (deletion / insertion / perturbation curves). Each figure is drawn on its own
``Figure`` object (no pyplot state), so metrics running in worker threads do not interfere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from xai_plugins.toolkit import colorize, overlay, to_numpy_image


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def line_plot(
    x: Sequence[float] | Sequence[str],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    xlabel: str = "",
    ylim: tuple[float, float] | None = None,
    styles: dict[str, str] | None = None,
) -> bytes:
    """One line per series over ``x`` (numbers, or category labels drawn rotated)."""
    from matplotlib.figure import Figure

    categorical = bool(x) and isinstance(x[0], str)
    width = max(5.0, min(14.0, 0.28 * len(x))) if categorical else 5.5
    fig = Figure(figsize=(width, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    pos = np.arange(len(x)) if categorical else np.asarray(x, dtype=float)
    for name, values in series.items():
        ax.plot(
            pos, np.asarray(values, dtype=float), (styles or {}).get(name, "-o"), label=name, markersize=3
        )
    if categorical:
        ax.set_xticks(pos)
        ax.set_xticklabels(list(x), rotation=75, fontsize=7)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)


def map_grid(
    columns: Sequence[tuple[str, torch.Tensor]],
    images: torch.Tensor | None = None,
    title: str = "",
    max_columns: int = 12,
    cell: int = 72,
) -> bytes:
    """Rows: images; columns: the input (when given), then each named B x H x W map in [0, 1]
    (overlaid on the input when given), ``cell`` px each, names on top. More than ``max_columns``
    maps: evenly spaced ones, the first and the last kept."""
    from PIL import Image, ImageDraw

    if len(columns) > max_columns:
        keep = sorted(set(np.linspace(0, len(columns) - 1, max_columns).round().astype(int).tolist()))
        columns = [columns[i] for i in keep]
    rows = int(columns[0][1].shape[0]) if columns else 0
    names = (["input"] if images is not None else []) + [name for name, _ in columns]
    head, gap, top = 26, 2, 14 if title else 0
    width = len(names) * (cell + gap) + gap
    canvas = Image.new("RGB", (width, top + head + rows * (cell + gap) + gap), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((gap, 1), title, fill="black")
    for c, name in enumerate(names):
        x0 = gap + c * (cell + gap)
        for i, line in enumerate(_wrap(name, cell // 6)[:2]):
            draw.text((x0, top + 1 + 11 * i), line, fill="black")
    for r in range(rows):
        tiles = [to_numpy_image(images[r])] if images is not None else []
        for _, maps in columns:
            m = maps[r].detach().float().cpu()
            tiles.append(overlay(images[r], m, alpha=0.6) if images is not None else colorize(m))
        for c, tile in enumerate(tiles):
            pil = Image.fromarray((np.clip(tile, 0, 1) * 255).round().astype(np.uint8))
            canvas.paste(
                pil.resize((cell, cell), Image.Resampling.NEAREST),
                (gap + c * (cell + gap), top + head + r * (cell + gap)),
            )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _wrap(text: str, width: int) -> list[str]:
    """Split a dotted layer name into lines of at most ``width`` characters (at dots when possible)."""
    lines, line = [], ""
    for part in text.replace(".", ". ").split(" "):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    lines.append(line)
    return [ln[:width] for ln in lines if ln]
