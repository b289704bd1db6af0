"""The resolve stage's product: the model version's weights inside the stage output, so that the
later stages need no registry, and what is known about it (fingerprint, preprocessing, classes).

Reference architectures are written as xai checkpoints (weights only, safe to load). Any other
``nn.Module`` (e.g. an MLflow pytorch-flavor model) is written as a pickled module: the stage wrote
it from a source the user trusted to load, and the later stages load it back with ``unsafe=True``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.fitting import model_fingerprint
from core.models import LoadedModel, known_architecture, load_model, save_checkpoint
from core.preprocess import Preprocess
from pipelines import layout


def save_resolved(loaded: LoadedModel, out_dir: Path, source: dict[str, str]) -> dict[str, Any]:
    """Write model.pt and model.json; returns the model.json content."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / layout.MODEL
    model = loaded.model.eval()
    if known_architecture(loaded.arch) and loaded.class_names and loaded.preprocess is not None:
        save_checkpoint(path, model, loaded.arch, loaded.preprocess, loaded.class_names, loaded.meta)
        fmt = "xai-checkpoint"
    else:
        try:
            import cloudpickle as pickle_module  # classes defined in a user's __main__ survive
        except ImportError:  # pragma: no cover - mlflow depends on cloudpickle
            import pickle as pickle_module
        tmp = path.with_suffix(".tmp")
        torch.save(model, tmp, pickle_module=pickle_module)
        tmp.replace(path)
        fmt = "pickled-module"
    info = {
        "source": source,
        "format": fmt,
        "fingerprint": model_fingerprint(model),
        "arch": loaded.arch or type(model).__qualname__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "preprocess": loaded.preprocess.as_dict() if loaded.preprocess is not None else None,
        "class_names": list(loaded.class_names) if loaded.class_names else None,
        "meta": json.loads(json.dumps(loaded.meta or {}, default=str)),
    }
    (out_dir / layout.MODEL_INFO).write_text(json.dumps(info, indent=2))
    return info


def load_resolved(out_dir: Path) -> tuple[LoadedModel, dict[str, Any]]:
    """The model written by :func:`save_resolved`, with its preprocessing and class names."""
    info = json.loads((out_dir / layout.MODEL_INFO).read_text())
    loaded = load_model(out_dir / layout.MODEL, unsafe=info["format"] == "pickled-module")
    if loaded.preprocess is None and info.get("preprocess"):
        loaded.preprocess = Preprocess.from_dict(info["preprocess"])
    if loaded.class_names is None:
        loaded.class_names = info.get("class_names")
    loaded.arch = loaded.arch or info.get("arch")
    return loaded, info
