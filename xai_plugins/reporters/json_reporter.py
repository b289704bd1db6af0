"""The `json` reporter: every figure of a run, machine-readable: results.json, maps.npz (every map)
and signed.npz (the channel-summed relevance of methods whose sign matters, LRP and DeepLIFT, so a
later reader such as the registry worker draws them red/blue)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xai_plugins import Reporter, RunResults, hookimpl, redact
from xai_plugins.toolkit import signed_relevance


def jsonable(value: Any) -> Any:
    """Convert tensors, numpy values and paths to JSON types; NaN/inf become null (the run records
    non-finite model outputs as a failure, so a null never hides one)."""
    if isinstance(value, torch.Tensor):
        return (
            jsonable(value.detach().cpu().tolist())
            if value.numel() <= 4096
            else f"<tensor {tuple(value.shape)}>"
        )
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist()) if value.size <= 4096 else f"<array {value.shape}>"
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return str(value)


def results_dict(results: RunResults) -> dict[str, Any]:
    """The JSON document of a run."""
    names = results.class_names
    images = []
    for i, name in enumerate(results.image_names):
        t, p = int(results.targets[i]), int(results.predictions[i])
        row = {
            "name": name,
            "target": t,
            "prediction": p,
            "probability": jsonable(float(results.probabilities[i, p])),
        }
        if names:
            row["target_name"], row["prediction_name"] = names[t], names[p]
        if results.labels is not None:
            row["label"] = int(results.labels[i])
            row["correct"] = row["label"] == p
        images.append(row)
    methods = {}
    for label, exp in results.explanations.items():
        extras = {k: v for k, v in exp.extras.items() if k != "images"}
        methods[label] = {
            "method": exp.method,
            "params": redact(jsonable(exp.params)),
            "seconds": jsonable(exp.seconds),
            "seconds_per_image": jsonable(exp.seconds / max(1, len(results.image_names))),
            "attribution_shape": list(exp.attributions.shape),
            "extras": redact(jsonable(extras)),
        }
    return {
        "meta": redact(jsonable(results.meta)),
        "images": images,
        "methods": methods,
        "metrics": jsonable(results.metrics),
        "global_metrics": jsonable(results.global_metrics),
        "failures": redact([f.as_dict() for f in results.failures]),
        "skipped_inputs": redact(jsonable(results.skipped_inputs)),
        "timings": jsonable(results.timings),
        "figures": sorted(results.figures),
    }


class JSONReporter(Reporter):
    """Writes results.json (all figures, failures, skipped inputs) and maps.npz (every map)."""

    name = "json"
    params = {"filename": "results.json", "save_maps": True}

    def write(self, results: RunResults, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / self.config["filename"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results_dict(results), indent=2, allow_nan=False))
        tmp.replace(path)
        if self.config["save_maps"] and results.explanations:
            np.savez_compressed(
                out_dir / "maps.npz",
                **{label.replace("/", "_"): exp.maps.numpy() for label, exp in results.explanations.items()},
            )
            signed = signed_relevance(results.explanations)
            if signed:
                np.savez_compressed(
                    out_dir / "signed.npz",
                    **{label.replace("/", "_"): r.detach().cpu().numpy() for label, r in signed.items()},
                )
        return path


@hookimpl
def xai_reporters():
    return [JSONReporter]
