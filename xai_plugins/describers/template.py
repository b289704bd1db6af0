"""The `template` describer: plain sentences about a heat map, with no model (DeConvolve, 3.4.1).

It states what a multimodal LLM would be asked to see, measured instead of guessed: where the hot
region lies (a 3 x 3 grid: top-left ... bottom-right), how large it is (share of the image), how
compact (one compact spot, an elongated region, or several scattered spots), its colour in the image,
how much of it lies on a known mask (when the context gives one), and the sign and size of the
filter's score (Algorithm 1) for the explained class.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from xai_plugins import Describer, hookimpl

SIZE_WORDS = ((0.02, "tiny"), (0.10, "small"), (0.25, "medium-sized"), (0.50, "large"), (1.01, "very large"))
HUES = (
    (15, "red"),
    (40, "orange"),
    (70, "yellow"),
    (160, "green"),
    (200, "cyan"),
    (255, "blue"),
    (290, "purple"),
    (335, "pink"),
    (361, "red"),
)


@dataclass
class RegionFacts:
    """Measured facts about the hot region of a heat map (coordinates as fractions of the image)."""

    area: float  # share of the image
    cy: float  # centre of mass, 0 = top
    cx: float  # 0 = left
    components: int
    fill: float  # area of the largest component / its bounding box (1 = a filled rectangle)
    region: np.ndarray  # H x W bool


def as_array(x: Any) -> np.ndarray:
    return (
        x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    )


def region_facts(heatmap: Any, threshold: float = 0.5) -> RegionFacts | None:
    """The region where the heat map reaches ``threshold`` of its maximum; None if the map is flat 0."""
    heat = np.nan_to_num(as_array(heatmap)).squeeze()
    top = float(heat.max()) if heat.size else 0.0
    if top <= 0:
        return None
    region = heat >= threshold * top
    h, w = region.shape
    weights = np.where(region, heat, 0.0)
    ys, xs = np.mgrid[0:h, 0:w]
    total = weights.sum()
    cy = float((weights * (ys + 0.5)).sum() / total / h)
    cx = float((weights * (xs + 0.5)).sum() / total / w)
    from scipy import ndimage  # here: scipy's import is paid only when a text is described

    labels, n = ndimage.label(region, structure=np.ones((3, 3)))
    sizes = ndimage.sum(region, labels, index=range(1, n + 1)) if n else np.zeros(0)
    biggest = int(np.argmax(sizes)) + 1 if n else 0
    fill = 0.0
    if n:
        sl = ndimage.find_objects(labels)[biggest - 1]
        box = (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)
        fill = float(sizes[biggest - 1]) / max(1, box)
    return RegionFacts(float(region.mean()), cy, cx, int(n), fill, region)


def position_name(cy: float, cx: float) -> str:
    """A 3 x 3 grid name: "top-left", "top-center", ..., "center", ..., "bottom-right"."""
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "center"
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if v == h == "center" else f"{v}-{h}"


def size_name(area: float) -> str:
    return next(word for limit, word in SIZE_WORDS if area < limit)


def region_phrase(facts: RegionFacts) -> str:
    """ "one compact, small region", "3 separate regions, large in all", ..."""
    size = size_name(facts.area)
    if facts.components == 1:
        shape = "compact" if facts.fill >= 0.45 else "elongated or irregular"
        return f"one {shape}, {size} region"
    kind = "separate" if facts.components <= 3 else "scattered"
    return f"{facts.components} {kind} regions, {size} in all"


def colour_name(rgb: np.ndarray) -> str:
    """A plain colour word for a mean RGB in [0, 1]."""
    r, g, b = (float(c) for c in np.clip(rgb, 0, 1))
    hue, light, sat = colorsys.rgb_to_hls(r, g, b)
    if sat < 0.2 or max(r, g, b) - min(r, g, b) < 0.1:
        return "black" if light < 0.2 else "dark grey" if light < 0.4 else "grey" if light < 0.75 else "white"
    name = next(word for limit, word in HUES if hue * 360 < limit)
    return f"dark {name}" if light < 0.3 else f"light {name}" if light > 0.75 else name


def score_phrase(score: float, class_name: str) -> str:
    size = abs(score)
    strength = "strongly" if size >= 0.2 else "moderately" if size >= 0.05 else "weakly"
    if score > 0:
        return f"supports {class_name} {strength} (score {score:+.3f})"
    if score < 0:
        return f"speaks against {class_name} {strength} (score {score:+.3f})"
    return f"does not change the probability of {class_name} (score 0)"


class TemplateDescriber(Describer):
    """Describes a heat map in plain sentences without any model (position, extent, compactness,
    colour, overlap with a known mask, sign and size of the score)."""

    name = "template"
    params = {"threshold": 0.5, "mask_name": "the object"}

    def describe(self, image: Any, heatmap: Any, context: dict[str, Any]) -> str:
        context = context or {}
        who = context.get("subject") or self._subject(context)
        class_name = context.get("class_name")
        class_name = f"'{class_name}'" if class_name is not None else "the explained class"
        score = context.get("score")
        facts = region_facts(heatmap, float(self.config["threshold"]))
        if facts is None:
            tail = f"; it {score_phrase(float(score), class_name)} when active" if score is not None else ""
            return f"{who} is silent on this image{tail}."
        pos = position_name(facts.cy, facts.cx)
        place = f" in the {pos} of the image" if facts.components == 1 else f", around the {pos} of the image"
        first = f"{who} highlights {region_phrase(facts)} (about {facts.area:.0%} of the image){place}"
        if image is not None:
            img = as_array(image)
            if img.ndim == 3 and img.shape[0] in (1, 3):
                img = img.transpose(1, 2, 0)
            if img.ndim == 3 and img.shape[:2] == facts.region.shape:
                first += f", mostly {colour_name(img[facts.region].reshape(-1, img.shape[2])[:, :3].mean(0))}"
        parts = [first + "."]
        second = []
        mask = context.get("mask")
        if mask is not None:
            m = as_array(mask).astype(bool).squeeze()
            if m.shape == facts.region.shape:
                inside = float(m[facts.region].mean())
                where = (
                    "lies on"
                    if inside >= 0.75
                    else "lies mostly outside"
                    if inside <= 0.25
                    else "partly overlaps"
                )
                second.append(
                    f"{where} {context.get('mask_name') or self.config['mask_name']} ({inside:.0%} inside)"
                )
        if score is not None:
            second.append(score_phrase(float(score), class_name))
        if second:
            parts.append("It " + " and ".join(second) + ".")
        return " ".join(parts)

    @staticmethod
    def _subject(context: dict[str, Any]) -> str:
        if context.get("filter") is not None and context.get("layer"):
            return f"Filter {context['filter']} of layer {context['layer']}"
        if context.get("filter") is not None:
            return f"Filter {context['filter']}"
        return "The heat map"


@hookimpl
def xai_describers():
    return [TemplateDescriber]
