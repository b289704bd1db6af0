"""One MLflow run per model version and pipeline configuration.

The run carries the tag ``xai.job_key`` (``<model>/<version>@<config hash>``). A finished run with
that key means the work is done (a worker that died after logging it does not log a second one); a
run left unfinished by a dead or failed attempt is deleted before the next attempt starts its own,
so each version has exactly one live run per configuration.

What is logged: every map as PNG (``maps/<method>/<NNN>_<image>.png``, over the probe image when the
probe can be rebuilt, else the colorized map; the signed relevance of LRP and DeepLIFT from
``signed.npz`` drawn red/blue like the HTML report), the headline metrics and every scalar of results.json,
``results.json``, the self-contained ``report.html``, the gate verdict ``gate.json`` (also as tags
``xai.gate`` and metric ``gate/passed``), the DVC plots as CSV and ``model.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from core.redact import redact_text
from registry.models import _experiment_id
from xai_plugins.reporters.mlflow_reporter import flat_metrics, log_files, log_metrics, map_pngs

log = logging.getLogger("xai.registry")
KEY_TAG = "xai.job_key"
LOGGED_TAG = "xai.logged"


def find_or_start(
    client: Any, experiment: str, job_key: str, name: str, version: str, config: str
) -> tuple[str, bool]:
    """(run id, already complete). Deletes leftover unfinished runs of earlier attempts."""
    from mlflow.entities import ViewType

    exp_id = _experiment_id(client, experiment)
    runs = client.search_runs(
        [exp_id],
        filter_string=f"tags.`{KEY_TAG}` = '{job_key}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=100,
    )
    complete = [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get(LOGGED_TAG) == "true"]
    if complete:
        return complete[0].info.run_id, True
    for run in runs:
        log.info("deleting run %s left by an earlier attempt of %s", run.info.run_id, job_key)
        client.delete_run(run.info.run_id)
    run = client.create_run(
        exp_id,
        run_name=f"{name}-v{version}",
        tags={
            KEY_TAG: job_key,
            "xai.model": name,
            "xai.version": version,
            "xai.config": config,
            "mlflow.note.content": f"Explanations, sanity checks and gate of model version {name} {version}.",
        },
    )
    return run.info.run_id, False


def _probe_images(workspace: Path, out_dir: Path) -> Any:
    """The probe images the maps were computed on (None when they cannot be rebuilt)."""
    try:
        import yaml

        from core.preprocess import Preprocess
        from pipelines.probe import load_probe, preprocess_for

        params = yaml.safe_load((workspace / "params.yaml").read_text()) or {}
        info = json.loads((out_dir / "model.json").read_text())
        stored = Preprocess.from_dict(info["preprocess"]) if info.get("preprocess") else None
        spec = params.get("probe") or {}
        return load_probe(spec, preprocess_for(spec, stored), info.get("class_names"), workspace).images
    except Exception as exc:  # the colorized maps are still logged
        log.warning("probe images not rebuilt (%s); logging colorized maps", exc)
        return None


def _maps(out_dir: Path, report_dir: Path, names: list[str], workspace: Path) -> dict[str, bytes]:
    npz = report_dir / "maps.npz"
    if not npz.is_file():
        return {}
    with np.load(npz) as data:
        maps = {k: data[k] for k in data.files}
    signed_npz = report_dir / "signed.npz"
    signed: dict[str, np.ndarray] = {}
    if signed_npz.is_file():
        with np.load(signed_npz) as data:
            signed = {k: data[k] for k in data.files if k in maps}
    images = _probe_images(workspace, out_dir)
    if images is not None and any(len(m) != len(images) for m in maps.values()):
        images = None
    return map_pngs(maps, names, images, signed=signed)


def log_outputs(client: Any, run_id: str, result: dict[str, Any], workspace: Path) -> dict[str, Any]:
    """Log a finished pipeline run (the dict of ``pipelines.api.run_version``); returns the verdict."""
    out_dir = Path(result["out_dir"])
    results_path, report_path = Path(result["results"]), Path(result["report"])
    results = json.loads(results_path.read_text())
    names = [row.get("name", f"image_{i}") for i, row in enumerate(results.get("images", []))]
    verdict = result.get("gate") or {
        "passed": False,
        "status": "error",
        "checks": [],
        "reason": "the pipeline produced no verdict",
    }
    files = _maps(out_dir, results_path.parent, names, workspace)
    files["results.json"] = results_path.read_bytes()
    files["report.html"] = report_path.read_bytes()
    files["gate.json"] = json.dumps(verdict, indent=2, default=str).encode()
    for extra in ("model.json", "metrics.json"):
        if (out_dir / extra).is_file():
            files[f"pipeline/{extra}"] = (out_dir / extra).read_bytes()
    for csv in sorted((out_dir / "plots").rglob("*.csv")) if (out_dir / "plots").is_dir() else []:
        files[f"pipeline/plots/{csv.relative_to(out_dir / 'plots')}"] = csv.read_bytes()
    for png in sorted(results_path.parent.rglob("*.png")):
        files.setdefault(f"figures/{png.relative_to(results_path.parent)}", png.read_bytes())
    log_files(client, run_id, files)
    metrics = flat_metrics(results.get("metrics") or {}, results.get("global_metrics") or {})
    metrics["gate/passed"] = 1.0 if verdict.get("passed") else 0.0
    metrics["gate/checks_failed"] = float(sum(1 for c in verdict.get("checks") or [] if not c.get("passed")))
    metrics["failures"] = float(len(results.get("failures") or []))
    log_metrics(client, run_id, metrics)
    client.log_param(run_id, "methods", ",".join(results.get("methods") or {})[:6000])
    client.log_param(run_id, "images", str(len(names)))
    return verdict


def finish(client: Any, run_id: str, verdict: dict[str, Any]) -> None:
    """Tag the run with the gate status and mark it complete (the idempotency marker)."""
    client.set_tag(
        run_id, "xai.gate", str(verdict.get("status") or ("passed" if verdict.get("passed") else "failed"))
    )
    client.set_tag(run_id, LOGGED_TAG, "true")
    client.set_terminated(run_id, "FINISHED")


def fail(client: Any, run_id: str, reason: str) -> None:
    client.set_tag(run_id, "xai.error", redact_text(reason)[:5000])
    client.set_terminated(run_id, "FAILED")


def logged_verdict(client: Any, run_id: str) -> dict[str, Any]:
    """The gate verdict a complete run holds (``gate.json``)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "gate.json", tmp)
        return json.loads(Path(path).read_text())
