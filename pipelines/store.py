"""What passes between stages: explanations (explain -> evaluate, report) and metric values
(evaluate -> report), as ``torch.save`` files that load with ``weights_only=True``.

Extras that are not tensors, numbers, strings, bytes or containers of them are kept as their
``str`` (numpy arrays become tensors), so a plugin's odd extra never makes a stage file unloadable.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.types import Explanation, Failure

EXPLANATIONS_FORMAT = "xai-explanations/1"
EVALUATION_FORMAT = "xai-evaluation/1"


def sanitize(value: Any) -> Any:
    """A ``weights_only``-loadable copy of ``value``."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, bytes, bool, int, float)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [sanitize(v) for v in value]
    return str(value)


def _save(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load(path: Path, fmt: str) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} file")
    return payload


def failures_to_dicts(failures: list[Failure]) -> list[dict[str, str]]:
    return [f.as_dict() for f in failures]


def failures_from_dicts(items: list[dict[str, str]]) -> list[Failure]:
    return [
        Failure(d["plugin"], d["name"], d["kind"], d["message"], d.get("stage", "explain")) for d in items
    ]


def save_explanations(
    path: Path,
    explanations: dict[str, Explanation],
    targets: torch.Tensor,
    logits: torch.Tensor,
    failures: list[Failure],
    fit_info: dict[str, Any],
) -> None:
    methods = {
        label: {
            "method": e.method,
            "attributions": e.attributions,
            "maps": e.maps,
            "targets": e.targets,
            "extras": sanitize(e.extras),
            "params": sanitize(e.params),
            "seconds": float(e.seconds),
        }
        for label, e in explanations.items()
    }
    _save(
        path,
        {
            "format": EXPLANATIONS_FORMAT,
            "methods": sanitize(methods),
            "targets": targets.cpu(),
            "logits": logits.cpu(),
            "failures": failures_to_dicts(failures),
            "fitted": sanitize(fit_info),
        },
    )


def load_explanations(path: Path) -> dict[str, Any]:
    """{"explanations": {label: Explanation}, "targets", "logits", "failures": [Failure], "fitted"}."""
    payload = _load(path, EXPLANATIONS_FORMAT)
    explanations = {label: Explanation(**d) for label, d in payload["methods"].items()}
    return {
        "explanations": explanations,
        "targets": payload["targets"],
        "logits": payload["logits"],
        "failures": failures_from_dicts(payload["failures"]),
        "fitted": payload["fitted"],
    }


def save_evaluation(
    path: Path,
    metrics: dict,
    global_metrics: dict,
    figures: dict[str, bytes],
    failures: list[Failure],
    timings: dict[str, float],
    meta: dict[str, Any],
) -> None:
    _save(
        path,
        {
            "format": EVALUATION_FORMAT,
            "metrics": sanitize(metrics),
            "global_metrics": sanitize(global_metrics),
            "figures": sanitize(figures),
            "failures": failures_to_dicts(failures),
            "timings": sanitize(timings),
            "meta": sanitize(meta),
        },
    )


def load_evaluation(path: Path) -> dict[str, Any]:
    payload = _load(path, EVALUATION_FORMAT)
    payload["failures"] = failures_from_dicts(payload["failures"])
    return payload


def scalar(value: Any) -> float | int | bool | None:
    """A finite number (or bool) for metrics.json; anything else is None."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return None


def curve(value: Any) -> list[float] | None:
    """A list of at least two finite numbers (a curve worth plotting), else None."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        value = value.tolist()
    if isinstance(value, np.ndarray) and value.ndim == 1:
        value = value.tolist()
    if (
        isinstance(value, (list, tuple))
        and len(value) >= 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    ):
        return [float(v) for v in value]
    return None
