"""The embedded MLflow tracking server: ``xai mlflow start|stop|status``.

A real ``mlflow server`` with a sqlite backend and a local artifact store (served through the server)
under the workspace, bound to 127.0.0.1 on a free port, with the environment MLflow needs to deliver
webhooks to a loopback receiver (DESIGN.md, MLOps pieces) and a webhook-secret encryption key that is
created once and kept in the workspace, so webhooks survive restarts. Its PID and URI are recorded
in the workspace; ``stop`` ends exactly that process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from core.errors import XAIError
from registry.state import State, private_file

HEALTH_TIMEOUT = 180.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def encryption_key(state: State) -> str:
    from cryptography.fernet import Fernet

    return private_file(state.mlflow_dir / "webhook-encryption.key", lambda: Fernet.generate_key().decode())


def server_env(key: str) -> dict[str, str]:
    """The environment of the embedded server (webhooks to a loopback receiver, quick pick-up of a
    newly created webhook, no telemetry)."""
    env = dict(os.environ)
    env.update(
        {
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
            "MLFLOW_WEBHOOK_CACHE_TTL": env.get("MLFLOW_WEBHOOK_CACHE_TTL", "2"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            # MLflow 3's job runner (GenAI jobs; not needed for webhooks) forks ~6 huey consumer processes.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        }
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return status != "Z"
    except (OSError, IndexError):
        return True


def _is_our_server(pid: int, state: State) -> bool:
    """The recorded PID is still the server we started (not a reused PID)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return pid_alive(pid)
    return "mlflow" in cmd and str(state.mlflow_dir) in cmd


def status(workspace: str | Path | None = None) -> dict[str, Any]:
    """The recorded server and whether it is running and healthy."""
    state = State(workspace)
    record = state.read_json(state.server_file) or {}
    pid = record.get("pid")
    running = bool(pid) and pid_alive(int(pid)) and _is_our_server(int(pid), state)
    return {**record, "running": running, "healthy": running and healthy(record.get("uri", ""))}


def start(
    workspace: str | Path | None = None,
    port: int | None = None,
    timeout: float = HEALTH_TIMEOUT,
    log: Any = None,
) -> dict[str, Any]:
    """Start the embedded server (or return the running one) and wait until ``/health`` answers."""
    state = State(workspace).ensure()
    current = status(workspace)
    if current.get("running"):
        if not current["healthy"] and not _wait_healthy(current["uri"], int(current["pid"]), timeout):
            raise XAIError(
                f"MLflow server (PID {current['pid']}) is running but not healthy; see {current.get('log')}"
            )
        return current
    state.mlflow_dir.mkdir(parents=True, exist_ok=True)
    key = encryption_key(state)
    previous = state.read_json(state.server_file) or {}
    port = port or _reusable(previous.get("port")) or free_port()
    uri = f"http://127.0.0.1:{port}"
    log_path = state.mlflow_dir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{state.mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(state.mlflow_dir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            env=server_env(key),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=state.mlflow_dir,
        )
    record = {
        "pid": proc.pid,
        "uri": uri,
        "port": port,
        "log": str(log_path),
        "backend": f"sqlite:///{state.mlflow_dir / 'mlflow.db'}",
        "artifacts": str(state.mlflow_dir / "artifacts"),
        "started_at": time.time(),
    }
    state.write_json(state.server_file, record)
    if log:
        log(f"starting MLflow at {uri} (PID {proc.pid}, log {log_path}) ...")
    if not _wait_healthy(uri, proc.pid, timeout, proc):
        tail = log_path.read_text(errors="replace")[-2000:]
        _terminate(proc.pid)
        raise XAIError(f"MLflow server did not become healthy within {timeout:.0f}s:\n{tail}")
    return {**record, "running": True, "healthy": True}


def _reusable(port: Any) -> int | None:
    """The port of the last run when it is free again (a bookmarked UI address keeps working)."""
    if not isinstance(port, int):
        return None
    try:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    except OSError:
        return None
    return port


def _wait_healthy(uri: str, pid: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(uri):
            return True
        if (proc is not None and proc.poll() is not None) or not pid_alive(pid):
            return False
        time.sleep(0.3)
    return False


def _terminate(pid: int, grace: float = 15.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop(workspace: str | Path | None = None) -> bool:
    """Stop the recorded server by its PID (process group). Returns whether one was running."""
    state = State(workspace)
    current = status(workspace)
    if not current.get("pid") or not current.get("running"):
        return False
    _terminate(int(current["pid"]))
    record = state.read_json(state.server_file) or {}
    record["stopped_at"] = time.time()
    state.write_json(state.server_file, record)
    return True
