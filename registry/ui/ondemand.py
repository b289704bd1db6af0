"""Explain on demand: an uploaded image (bounded in bytes and pixels, checked by content with Pillow)
or a `shapes` sample, through the version's own preprocessing and ``core.api.explain``. Each version's
model is loaded once (weights only, as ``models:/`` loading does by default) and kept by the app."""

from __future__ import annotations

import io
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MAX_BYTES = 4 * 1024 * 1024
MAX_PIXELS = 4_000_000


class UploadError(ValueError):
    """A one-line reason an upload is refused."""


def check_upload(data: bytes) -> None:
    """Refuse empty, oversized, non-image or oversized-in-pixels uploads before anything decodes them."""
    from PIL import Image

    if not data:
        raise UploadError("the upload is empty")
    if len(data) > MAX_BYTES:
        raise UploadError(f"the upload is {len(data):,} bytes; at most {MAX_BYTES:,}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise UploadError(f"the image is {w}x{h} px; at most {MAX_PIXELS:,} pixels")
            img.verify()
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(f"not a readable image ({type(exc).__name__})") from None


class Models:
    """The models of the versions asked about, loaded once each."""

    def __init__(self, tracking_uri: str):
        self.uri, self._loaded, self._lock = tracking_uri, {}, threading.Lock()

    def get(self, name: str, version: str) -> Any:
        with self._lock:
            key = (name, version)
            if key not in self._loaded:
                from registry.models import load_version

                self._loaded[key] = load_version(
                    f"models:/{name}/{version}", unsafe=False, tracking_uri=self.uri
                )
            return self._loaded[key]


def sample_image(loaded: Any, index: int) -> Any:
    """A `shapes` sample at the model's size (C x H x W in [0, 1])."""
    from core.datasets import make_shapes

    hw = loaded.preprocess.hw if loaded.preprocess is not None else None
    return make_shapes(index + 1, size=(hw[0] if hw else 32), seed=2026).images[index]


def upload_image(loaded: Any, data: bytes) -> Any:
    from core.images import load_image

    check_upload(data)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        return load_image(path, loaded.preprocess, convert=True)


def explain_one(
    loaded: Any, image: Any, method: str, target: int | None, layer: str | None
) -> dict[str, Any]:
    """PNG data URIs of the image and its map (signed red/blue for LRP and DeepLIFT), or the error."""
    from core.api import explain
    from core.plugins import signed_relevance
    from core.render import data_uri, display_scale, overlay, png_bytes, signed_overlay

    params = {"layer": layer} if layer else {}
    scale = display_scale(image.shape[-2])
    started = time.perf_counter()
    out: dict[str, Any] = {"image": data_uri(png_bytes(image, scale))}
    try:
        exp = explain(
            loaded.model, loaded.preprocess.normalize(image[None]), targets=target, method=method, **params
        )
    except Exception as exc:
        out["error"] = f"{method}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        return out
    signed = signed_relevance({method: exp}).get(method)
    picture = signed_overlay(image, signed[0]) if signed is not None else overlay(image, exp.maps[0])
    names = loaded.class_names or []
    t = int(exp.targets[0]) if exp.targets is not None else None
    out.update(method_extras(exp.extras, scale))
    out.update(
        {
            "map": data_uri(png_bytes(picture, scale)),
            "target": t,
            "target_name": names[t] if t is not None and t < len(names) else str(t),
            "seconds": round(time.perf_counter() - started, 3),
            "layer": str(exp.extras.get("layer", "") or ""),
        }
    )
    return out


def method_extras(extras: dict[str, Any], scale: int) -> dict[str, Any]:
    """What DeConvolve and PV show beside the map, for the first image: ``panels`` (title, PNG data
    URI) from ``extras["images"]`` (DeConvolve's proportionate/encircled maps and top filter pattern,
    PV's reconstruction, PV and mask), DeConvolve's ``text`` and its chosen ``filters`` (filter,
    sign, score, sentence). JSON-safe; nothing for methods without these."""
    import torch

    from core.render import data_uri, png_bytes

    out: dict[str, Any] = {}
    panels = []
    for title, batch in (extras.get("images") or {}).items():
        if isinstance(batch, torch.Tensor) and batch.ndim >= 3 and len(batch):
            picture = batch[0].detach().float().cpu().clamp(0, 1)
            if picture.ndim == 3 and picture.shape[0] == 1:
                picture = picture[0]
            panels.append({"title": str(title), "image": data_uri(png_bytes(picture, scale))})
    if panels:
        out["panels"] = panels
    text = extras.get("text")
    if isinstance(text, list) and text:
        out["text"] = str(text[0])
    filters = extras.get("filters")
    if isinstance(filters, list) and filters and isinstance(filters[0], list):
        out["filters"] = [
            {
                "filter": int(f["filter"]),
                "sign": str(f["sign"]),
                "score": round(float(f["score"]), 4),
                "sentence": str(f.get("sentence", "")),
            }
            for f in filters[0]
        ]
    return out
