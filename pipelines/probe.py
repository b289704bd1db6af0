"""The probe set every version is explained on, from params.yaml's ``probe`` section.

    probe: {kind: shapes, n: 32, size: 32, seed: 1234, watermark: agree}       # generated, with masks
    probe: {kind: folder, images: probe/images, masks: probe/masks, spurious: probe/spurious}

Generated `shapes` come with object masks and watermark (spurious) masks. Folders are read with the
model's own preprocessing (``xai data shapes --out probe`` writes one); their paths are relative to
the workspace and belong in the ``deps`` of the explain stage. ``target`` (``predicted`` or
``label``) chooses the explained class. A model without stored preprocessing needs
``probe.preprocess: {size, mean, std}``: there is no hidden default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import InputError
from core.preprocess import Preprocess

KINDS = ("shapes", "folder")


@dataclass
class Probe:
    images: torch.Tensor  # N x C x H x W in [0, 1]
    inputs: torch.Tensor  # normalized for the model
    names: list[str]
    labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    spurious: torch.Tensor | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    targets: torch.Tensor | None = None  # None: the predicted class


def preprocess_for(spec: dict[str, Any], stored: Preprocess | None) -> Preprocess:
    """The model's stored preprocessing, or ``probe.preprocess`` when it has none (or overrides)."""
    if spec.get("preprocess"):
        return Preprocess.from_dict(spec["preprocess"])
    if stored is None:
        raise InputError(
            "the model has no stored preprocessing: set probe.preprocess: {size, mean, std} in params.yaml"
        )
    return stored


def _shapes(spec: dict[str, Any], class_names: list[str] | None) -> dict[str, Any]:
    from core.datasets import make_shapes

    ds = make_shapes(
        int(spec.get("n", 32)),
        size=int(spec.get("size", 32)),
        seed=int(spec.get("seed", 1234)),
        watermark=str(spec.get("watermark", "agree")),
    )
    names = [f"{i:04d}-{ds.class_names[int(c)]}" for i, c in enumerate(ds.labels)]
    # labels are only meaningful when the model's classes are the data set's
    same = class_names is None or list(class_names) == list(ds.class_names)
    return {
        "images": ds.images,
        "names": names,
        "labels": ds.labels if same else None,
        "masks": ds.masks,
        "spurious": ds.spurious,
        "skipped": [],
    }


def _folder(
    spec: dict[str, Any], pre: Preprocess, class_names: list[str] | None, root: Path
) -> dict[str, Any]:
    from core.cli import load_masks
    from core.images import load_folder

    if not spec.get("images"):
        raise InputError("probe.kind folder needs probe.images (a folder relative to the workspace)")
    imgs = load_folder(root / spec["images"], pre, class_names, convert=bool(spec.get("convert", False)))
    if not imgs.names:
        raise InputError(f"none of the probe images in {spec['images']!r} could be read")
    hw = tuple(imgs.images.shape[-2:])
    masks = load_masks(root / spec["masks"], imgs.names, hw) if spec.get("masks") else None
    spurious = load_masks(root / spec["spurious"], imgs.names, hw) if spec.get("spurious") else None
    return {
        "images": imgs.images,
        "names": imgs.names,
        "labels": imgs.labels,
        "masks": masks,
        "spurious": spurious,
        "skipped": imgs.skipped,
    }


def load_probe(spec: dict[str, Any], pre: Preprocess, class_names: list[str] | None, root: Path) -> Probe:
    """Build the probe set described by ``spec`` for a model with preprocessing ``pre``."""
    kind = spec.get("kind", "shapes")
    if kind == "shapes":
        data = _shapes(spec, class_names)
    elif kind == "folder":
        data = _folder(spec, pre, class_names, root)
    else:
        raise InputError(f"probe.kind {kind!r}: expected one of {', '.join(KINDS)}")
    if data["images"].shape[1] != pre.channels:
        raise InputError(
            f"the probe images have {data['images'].shape[1]} channels, the model expects {pre.channels}"
        )
    target = spec.get("target", "predicted")
    targets = None
    if target == "label":
        if data["labels"] is None:
            raise InputError("probe.target: label needs labels named like the model's classes")
        targets = data["labels"]
    elif target != "predicted":
        raise InputError(f"probe.target {target!r}: expected 'predicted' or 'label'")
    return Probe(
        images=data["images"],
        inputs=pre.normalize(data["images"]),
        names=data["names"],
        labels=data["labels"],
        masks=data["masks"],
        spurious=data["spurious"],
        skipped=data["skipped"],
        targets=targets,
    )


def load_fit_data(spec: dict[str, Any] | None, pre: Preprocess) -> Any:
    """``fit_data: {kind: shapes, n, size, seed, watermark}`` -> normalized FitData (None: the probe)."""
    if not spec:
        return None
    from core.datasets import make_shapes
    from core.fitting import FitData

    if spec.get("kind", "shapes") != "shapes":
        raise InputError("fit_data.kind: only 'shapes' is supported (or null to fit on the probe)")
    ds = make_shapes(
        int(spec.get("n", 256)),
        size=int(spec.get("size", 32)),
        seed=int(spec.get("seed", 7)),
        watermark=str(spec.get("watermark", "none")),
    )
    return FitData.coerce(ds, pre)
