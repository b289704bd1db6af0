"""Trained explainers: one mechanism for fitting, caching by model fingerprint, and storing.

An explainer with ``trainable = True`` implements ``fit(model, data) -> state`` and
``load_state(state)``. ``ensure_fitted`` trains it once per (model fingerprint, explainer name,
fit-relevant parameters, input shape) and stores the state under the fit store (``XAI_FIT_DIR``, default
``$XAI_HOME/fitted`` with ``XAI_HOME`` defaulting to ``~/.cache/xai``; never the working directory), so a second request for the same model version reuses it. The registry logs the
stored files as MLflow artifacts of the model version's run. ``fit`` may checkpoint to
``explainer.checkpoint_path`` and resume from it after an interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.datasets import ShapesData
from core.errors import XAIError


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the architecture name and every parameter/buffer (name, shape, dtype, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(
            t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        )  # 0-dim: BN counters
    return h.hexdigest()


class FitData:
    """Training data for a trained explainer: normalized model inputs and (optional) labels."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor | None = None, name: str = "data"):
        self.inputs, self.labels, self.name = inputs, labels, name

    @classmethod
    def coerce(cls, data: Any, preprocess: Any = None) -> FitData:
        if isinstance(data, FitData):
            return data
        if isinstance(data, ShapesData):
            x = preprocess.normalize(data.images) if preprocess is not None else data.images
            return cls(x, data.labels, name=f"shapes-{data.watermark}-{len(data)}")
        if isinstance(data, torch.Tensor):
            return cls(data)
        if isinstance(data, (tuple, list)) and len(data) == 2:
            return cls(data[0], data[1])
        raise TypeError(f"cannot use {type(data).__name__} as fit data")

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batches(self, batch_size: int = 64, shuffle: bool = False, seed: int = 0) -> Iterator[tuple]:
        n = len(self)
        order = (
            torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        )
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield self.inputs[idx], (self.labels[idx] if self.labels is not None else None)

    def split(self, fraction: float = 0.8) -> tuple[FitData, FitData]:
        k = max(1, int(len(self) * fraction))
        lab = self.labels
        return (
            FitData(self.inputs[:k], lab[:k] if lab is not None else None, self.name + "-train"),
            FitData(self.inputs[k:], lab[k:] if lab is not None else None, self.name + "-val"),
        )


def xai_home() -> Path:
    """The user's cache directory for state xai derives (``XAI_HOME``, else ``$XDG_CACHE_HOME/xai``,
    else ``~/.cache/xai``)."""
    if os.environ.get("XAI_HOME"):
        return Path(os.environ["XAI_HOME"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "xai"


def fit_root() -> Path:
    """Where fitted explainer state is stored: ``XAI_FIT_DIR``, else ``xai_home() / "fitted"``."""
    return Path(os.environ["XAI_FIT_DIR"]) if os.environ.get("XAI_FIT_DIR") else xai_home() / "fitted"


def fit_key(explainer: Any) -> str:
    """Hash of the parameters that change what ``fit`` learns (``fit_params``, default: all)."""
    names = getattr(explainer, "fit_params", None) or sorted(explainer.config)
    relevant = {k: explainer.config.get(k) for k in names}
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fit_path(
    explainer: Any, model: nn.Module, root: Path | None = None, input_shape: tuple[int, ...] | None = None
) -> Path:
    """Where the fitted state of ``explainer`` for ``model`` (and inputs of ``input_shape``, C x H x W:
    a decoder or filter maps are learnt for one image size) is stored."""
    fp = model_fingerprint(model)[:16]
    shape = "-" + "x".join(str(int(d)) for d in input_shape) if input_shape else ""
    return (root or fit_root()) / fp / f"{explainer.name}-{fit_key(explainer)}{shape}.pt"


def ensure_fitted(
    explainer: Any,
    model: nn.Module,
    data: Any = None,
    root: Path | None = None,
    force: bool = False,
    input_shape: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Load the explainer's stored state for this model and input shape (default: the fit data's),
    or fit and store it. Returns info."""
    if data is not None:
        data = FitData.coerce(data)
        shape = tuple(data.inputs.shape[1:])
        if input_shape is not None and tuple(input_shape) != shape:
            raise XAIError(
                f"{explainer.name}: the fit data are {'x'.join(map(str, shape))} but the inputs to "
                f"explain are {'x'.join(map(str, input_shape))}; fit on images of the same size"
            )
        input_shape = shape
    path = fit_path(explainer, model, root, input_shape)
    if path.is_file() and not force:
        state = torch.load(path, map_location="cpu", weights_only=True)
        explainer.load_state(state)
        return {"path": str(path), "reused": True}
    if data is None:
        raise ValueError(f"{explainer.name} must be fitted first: pass fit data (none stored at {path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    explainer.checkpoint_path = path.with_suffix(".partial.pt")
    state = explainer.fit(model, data)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    if explainer.checkpoint_path.exists():
        explainer.checkpoint_path.unlink()
    explainer.load_state(state)
    return {"path": str(path), "reused": False}
