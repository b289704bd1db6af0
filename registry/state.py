"""Where the registry loop keeps its state inside a workspace, and how it finds MLflow.

Everything lives under ``<workspace>/.xai/registry/`` (git-ignored): the embedded MLflow server's
database, artifacts, log, PID/URI record and webhook-secret encryption key; the job queue; the
listener's record. The workspace is ``--workspace``, else ``$XAI_WORKSPACE``, else the current folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

import yaml

from core.errors import XAIError

SECRET_ENV = "XAI_WEBHOOK_SECRET"
EXPERIMENT_ENV = "XAI_MLFLOW_EXPERIMENT"
DEFAULT_EXPERIMENT = "xai-explanations"


def workspace_path(workspace: str | Path | None = None) -> Path:
    return Path(workspace or os.environ.get("XAI_WORKSPACE") or ".").resolve()


class State:
    """Paths of one workspace's registry state (created on first use, ignored by git)."""

    def __init__(self, workspace: str | Path | None = None):
        self.workspace = workspace_path(workspace)
        self.root = self.workspace / ".xai" / "registry"

    def ensure(self) -> State:
        self.root.mkdir(parents=True, exist_ok=True)
        ignore = self.workspace / ".xai" / ".gitignore"
        if not ignore.exists():
            ignore.write_text("*\n")
        return self

    @property
    def mlflow_dir(self) -> Path:
        return self.root / "mlflow"

    @property
    def server_file(self) -> Path:
        return self.root / "mlflow-server.json"

    @property
    def listener_file(self) -> Path:
        return self.root / "listener.json"

    @property
    def queue_db(self) -> Path:
        return self.root / "queue.db"

    @property
    def worker_lock(self) -> Path:
        return self.root / "worker.lock"

    @property
    def secret_file(self) -> Path:
        return self.root / "webhook-secret"

    def read_json(self, path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def write_json(self, path: Path, data: dict[str, Any]) -> None:
        self.ensure()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


def private_file(path: Path, make: Any) -> str:
    """Read a secret file, creating it (mode 0600) with ``make()`` the first time."""
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return value


def tracking_uri(workspace: str | Path | None = None) -> str:
    """``$MLFLOW_TRACKING_URI`` as is when set; else the embedded server recorded in the workspace."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    record = State(workspace).read_json(State(workspace).server_file)
    if record and record.get("uri"):
        return str(record["uri"])
    raise XAIError(
        "no MLflow tracking server: run `xai mlflow start` in the workspace or set MLFLOW_TRACKING_URI"
    )


def webhook_secret(workspace: str | Path | None = None, create: bool = False) -> str:
    """``$XAI_WEBHOOK_SECRET``; else the embedded default's secret file (created when ``create``)."""
    value = os.environ.get(SECRET_ENV, "").strip()
    if value:
        return value
    state = State(workspace)
    if state.secret_file.is_file() or create:
        state.ensure()
        return private_file(state.secret_file, lambda: secrets.token_urlsafe(32))
    raise XAIError(
        f"no webhook secret: set {SECRET_ENV} (the same value the MLflow webhook was created with)"
    )


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT


def config_hash(workspace: str | Path | None = None) -> str:
    """A short hash of the workspace's pipeline configuration (dvc.yaml and params.yaml without the
    list of versions), so a job means "this version under this configuration"."""
    ws = workspace_path(workspace)
    h = hashlib.sha256()
    dvc_yaml = ws / "dvc.yaml"
    h.update(dvc_yaml.read_bytes() if dvc_yaml.is_file() else b"")
    params_file = ws / "params.yaml"
    params: Any = {}
    if params_file.is_file():
        params = yaml.safe_load(params_file.read_text()) or {}
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k != "versions"}
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
