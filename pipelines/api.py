"""The pipeline's contract with its callers (the registry worker, ``xai pipeline run``).

``run_version(workspace, name, version, uri=None, env=None)`` lists the version in params.yaml when
needed and runs ``dvc repro gate@<key>``: that version's five stages and nothing else, each only
when its inputs changed. It returns where everything is and the verdict, or raises
:class:`PipelineError` naming the stage that failed (the other versions' outputs are untouched).

Concurrency: DVC holds a repository lock for a whole ``dvc repro`` and refuses a second one, so
callers sharing a workspace are serialized on the workspace lock (:mod:`pipelines.lock`); params.yaml
writes take the same lock. Several versions at once go through ``dvc exp run --queue`` and
``dvc queue start -j N`` instead (docs/pipeline.md), or through separate workspaces.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from core.errors import XAIError
from pipelines import layout, procgroup
from pipelines.dvc_locks import drop_dead_holders
from pipelines.lock import workspace_lock
from pipelines.params import add_version, read_params, version_entry
from pipelines.workspace import dvc_env

_FAILED = re.compile(r"failed to reproduce '([^']+)'")
_RUNNING = re.compile(r"Running stage '([^']+)'")


class PipelineError(XAIError):
    """A pipeline run failed in ``stage`` (resolve, explain, evaluate, report, gate; or dvc)."""

    def __init__(self, stage: str, message: str, target: str | None = None, output: str = ""):
        super().__init__(f"pipeline stage {target or stage} failed: {message}")
        self.stage, self.message, self.target, self.output = stage, message, target, output


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def failure_from_output(output: str) -> PipelineError:
    """The failed stage and its reason, from dvc's output."""
    match = _FAILED.search(output)
    target = match.group(1) if match else None
    stage = target.split("@", 1)[0] if target else "dvc"
    reason = None
    for line in output.splitlines():
        if line.startswith("error: stage "):
            reason = line.split("failed: ", 1)[-1]
    if reason is None:
        errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
        reason = errors[-1].removeprefix("ERROR: ") if errors else _tail(output, 5)
    return PipelineError(stage, reason, target, output)


def run_dvc(
    workspace: Path, args: list[str], env: dict[str, str] | None = None, timeout: float | None = None
) -> tuple[int, str]:
    """Run ``dvc ARGS`` in ``workspace``; returns (exit code, stdout + stderr). dvc and the stages it
    runs form one process group that dies with this process (:mod:`pipelines.procgroup`) and is
    killed when we stop waiting for it: on a time-out, an exception or ``KeyboardInterrupt``. Lock
    entries of dead or zombie dvc processes are dropped first (:mod:`pipelines.dvc_locks`)."""
    drop_dead_holders(workspace)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.procgroup", *args],
        cwd=workspace,
        env=dvc_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=procgroup.die_with_parent(os.getpid()),
    )
    procgroup.track(proc.pid)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procgroup.kill_group(proc.pid)
        output, _ = proc.communicate()
        raise PipelineError("dvc", f"timed out after {timeout:.0f} s", output=output or "") from None
    finally:
        procgroup.kill_group(proc.pid)  # stages dvc left behind, or all of it when we were interrupted
    return proc.returncode, output or ""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def collect(workspace: str | Path, key: str) -> dict[str, Any]:
    """Paths and figures of one version's finished run."""
    ws = Path(workspace).resolve()
    entry = version_entry(read_params(ws), key)
    out = layout.version_dir(ws, entry)
    return {
        "key": key,
        "name": entry["name"],
        "version": entry["version"],
        "uri": entry["uri"],
        "out_dir": str(out),
        "results": str(out / layout.RESULTS),
        "report": str(out / layout.HTML),
        "gate": _read_json(out / layout.VERDICT),
        "metrics": _read_json(out / layout.METRICS),
        "model": _read_json(out / layout.MODEL_INFO),
    }


def run_version(
    workspace: str | Path,
    name: str,
    version: str,
    uri: str | None = None,
    env: dict[str, str] | None = None,
    *,
    force: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Add the version to params.yaml if needed and reproduce its stages only.

    Returns {"out_dir", "results" (results.json), "report" (report.html), "gate" (the verdict,
    core.policy format), "metrics" (metrics.json), "model" (model.json), "key", "name", "version",
    "uri", "stages_run" (the DVC stages that ran; empty when everything was up to date), "log"}.
    ``env`` is added to the stages' environment (MLFLOW_TRACKING_URI, XAI_DEVICE, ...).
    """
    ws = Path(workspace).resolve()
    if not (ws / ".dvc").is_dir() or not (ws / "dvc.yaml").is_file():
        raise PipelineError("dvc", f"{ws} is not a pipeline workspace: create it with `xai pipeline init`")
    with workspace_lock(ws):
        key = add_version(ws, name, version, uri)
        args = ["repro", *(["--force"] if force else []), f"gate@{key}"]
        code, output = run_dvc(ws, args, env, timeout)
        if code != 0:
            raise failure_from_output(output)
        result = collect(ws, key)
    result["stages_run"] = _RUNNING.findall(output)
    result["log"] = output
    return result


def run_all(
    workspace: str | Path,
    env: dict[str, str] | None = None,
    keep_going: bool = True,
    timeout: float | None = None,
) -> tuple[int, str]:
    """``dvc repro`` (``-k``: a failing version does not stop the others) under the workspace lock."""
    ws = Path(workspace).resolve()
    with workspace_lock(ws):
        return run_dvc(ws, ["repro", *(["--keep-going"] if keep_going else [])], env, timeout)


def status(workspace: str | Path) -> list[dict[str, Any]]:
    """One row per listed version: key, name, version, gate status (None: not run) and whether
    DVC considers its stages up to date."""
    ws = Path(workspace).resolve()
    params = read_params(ws)
    code, output = run_dvc(ws, ["status", "--json"])
    stale: set[str] = set()
    if code == 0:
        try:
            stale = {s.split("@", 1)[-1] for s in json.loads(output.strip().splitlines()[-1] or "{}")}
        except (json.JSONDecodeError, IndexError):
            stale = set()
    rows = []
    for key in params["versions"]:
        entry = version_entry(params, key)
        gate = _read_json(layout.version_dir(ws, entry) / layout.GATE) or {}
        rows.append(
            {
                "key": key,
                "name": entry["name"],
                "version": entry["version"],
                "uri": entry["uri"],
                "gate": gate.get("status"),
                "passed": gate.get("passed"),
                "up_to_date": key not in stale,
            }
        )
    return rows
