"""The `mlflow` reporter: a run's maps, metrics, results.json and report.html in an MLflow run.

Which run: the ``run_id`` parameter, else ``$MLFLOW_RUN_ID`` (the registry worker sets it for the
pipeline it runs), else the active run (``mlflow.start_run()`` around ``xai explain``), else a new
run in the ``experiment`` parameter (default ``$XAI_MLFLOW_EXPERIMENT`` or ``xai-explanations``),
finished after logging. The tracking server is ``tracking_uri`` or MLflow's own default
(``$MLFLOW_TRACKING_URI``). List it after ``json`` and ``html`` so their files exist when it runs.

Artifacts: ``maps/<method>/<NNN>_<image>.png`` (each map over its image), ``results.json``,
``report.html`` (self-contained; MLflow shows it in a sandboxed iframe). Metrics: ``<method>/<metric>``
and ``model/<metric>`` for every finite scalar. Writes ``mlflow-run.json`` (run id, URI) to out_dir.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from xai_plugins import Reporter, RunResults, XAIError, hookimpl
from xai_plugins.toolkit import colorize, display_scale, overlay, png_bytes, signed_overlay, signed_relevance

_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. /:]")
_FILE_BAD = re.compile(r"[^A-Za-z0-9_.-]")
LOGGED_FILES = ("results.json", "report.html")


def metric_key(*parts: str) -> str:
    """An MLflow-valid metric key from parts (invalid characters become ``_``)."""
    return "/".join(_KEY_BAD.sub("_", str(p)) for p in parts if str(p))[:250]


def flat_metrics(
    metrics: dict[str, dict[str, Any]], global_metrics: dict[str, Any] | None = None
) -> dict[str, float]:
    """Every finite scalar: ``<method>/<metric>`` and ``model/<metric>``."""
    out: dict[str, float] = {}
    groups = list(metrics.items()) + [("model", global_metrics or {})]
    for label, values in groups:
        for key, value in (values or {}).items():
            if isinstance(value, bool):
                value = float(value)
            if isinstance(value, (int, float)) and math.isfinite(float(value)):
                out[metric_key(label, key)] = float(value)
    return out


def log_metrics(client: Any, run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log metrics in batches (MLflow accepts 1000 per call)."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    items = [Metric(k, v, stamp, step) for k, v in sorted(values.items())]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i : i + 1000])


def map_pngs(
    maps: dict[str, Any],
    names: list[str],
    images: Any = None,
    alpha: float = 0.5,
    max_images: int | None = None,
    signed: dict[str, Any] | None = None,
) -> dict[str, bytes]:
    """``maps/<method>/<NNN>_<image>.png`` -> PNG bytes, for B x H x W maps in [0, 1] per method;
    each map over its image when ``images`` (B x 3 x H x W in [0, 1]) is given, else colorized.
    ``signed``: method -> B x H x W signed relevance, drawn red/blue over the image instead."""
    files: dict[str, bytes] = {}
    signed = signed or {}
    for label, batch in maps.items():
        n = len(batch) if max_images is None else min(len(batch), max_images)
        for i in range(n):
            if images is not None and label in signed:
                picture = signed_overlay(images[i], signed[label][i])
            else:
                picture = (
                    overlay(images[i], batch[i], alpha=alpha) if images is not None else colorize(batch[i])
                )
            stem = Path(names[i]).with_suffix("").name if i < len(names) else f"image_{i}"
            path = f"maps/{_FILE_BAD.sub('_', label)}/{i:03d}_{_FILE_BAD.sub('_', stem)}.png"
            files[path] = png_bytes(picture, display_scale(picture.shape[0]))
    return files


def log_files(client: Any, run_id: str, files: dict[str, bytes]) -> None:
    """Log in-memory files (relative artifact path -> bytes) in one upload."""
    if not files:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for rel, data in files.items():
            path = Path(tmp) / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        client.log_artifacts(run_id, tmp)


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return None


class MLflowReporter(Reporter):
    """Logs maps (PNG), metrics, results.json and report.html to an MLflow run."""

    name = "mlflow"
    params = {
        "tracking_uri": None,
        "experiment": None,
        "run_id": None,
        "run_name": None,
        "max_images": 64,
        "alpha": 0.5,
    }

    def write(self, results: RunResults, out_dir: Path) -> Path:
        try:
            import mlflow
            from mlflow import MlflowClient
        except ImportError:
            raise XAIError("the mlflow reporter needs MLflow: pip install 'xai-mlops[mlops]'") from None
        out_dir = Path(out_dir)
        client = MlflowClient(tracking_uri=self.config["tracking_uri"])
        run_id, own = self._run(mlflow, client)
        signed = signed_relevance(results.explanations)
        files = map_pngs(
            {label: exp.maps for label, exp in results.explanations.items()},
            results.image_names,
            results.images,
            float(self.config["alpha"]),
            int(self.config["max_images"]),
            signed,
        )
        for name in LOGGED_FILES:
            if (out_dir / name).is_file():
                files[name] = (out_dir / name).read_bytes()
        try:
            log_files(client, run_id, files)
            log_metrics(client, run_id, flat_metrics(results.metrics, results.global_metrics))
            client.set_tag(run_id, "xai.methods", ",".join(results.explanations)[:5000])
        except BaseException:
            if own:
                client.set_terminated(run_id, "FAILED")
            raise
        if own:
            client.set_terminated(run_id)
        run = client.get_run(run_id)
        uri = client.tracking_uri
        record = {
            "run_id": run_id,
            "experiment_id": run.info.experiment_id,
            "tracking_uri": uri,
            "artifact_uri": run.info.artifact_uri,
            "url": run_url(uri, run.info.experiment_id, run_id),
        }
        path = out_dir / "mlflow-run.json"
        path.write_text(json.dumps(record, indent=2))
        return path

    def _run(self, mlflow: Any, client: Any) -> tuple[str, bool]:
        """(run id, whether this reporter created it and must finish it)."""
        run_id = self.config["run_id"] or os.environ.get("MLFLOW_RUN_ID")
        if run_id:
            return str(run_id), False
        active = mlflow.active_run()
        if active is not None:
            return active.info.run_id, False
        name = self.config["experiment"] or os.environ.get("XAI_MLFLOW_EXPERIMENT") or "xai-explanations"
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run = client.create_run(exp_id, run_name=self.config["run_name"], tags={"xai.reporter": "mlflow"})
        return run.info.run_id, True


@hookimpl
def xai_reporters():
    return [MLflowReporter]
