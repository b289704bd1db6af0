"""The warm stage server (pipelines/stage_server.py, issue 19): the five stages of a version run
through it give the outputs of cold stage processes; the client's folder, environment, output and
status pass through; a killed client kills its stage; a missing or refusing server means a cold run.

A real server process, real ``python -m pipelines.stages`` clients, a real workspace (the one
``bench.stage_startup`` times).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.stage_startup import STAGES, make_workspace
from pipelines import layout, stage_server, store

ROOT = Path(__file__).resolve().parent.parent


def stage_env(server: dict[str, str] | None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XAI_NO_PROGRESS": "1", "XAI_DEVICE": "cpu", **extra}
    env.pop(stage_server.ENV, None)
    env.update(server or {})
    return env


def run(folder: Path, stage: str, env: dict[str, str], key: str = "cnn-v1") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.stages", stage, "--key", key],
        cwd=folder,  # no --workspace: the runner must take the client's working folder
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def server():
    with stage_server.start() as started:
        yield started


def test_stages_through_the_server_write_what_cold_stages_write(tmp_path, server):
    outputs = {}
    for mode, env in (("cold", stage_env(None)), ("warm", stage_env(server.env))):
        folder = tmp_path / mode
        make_workspace(folder)
        for stage in STAGES:
            proc = run(folder, stage, env)
            assert proc.returncode == 0, f"{mode} {stage}: {proc.stderr}"
            assert "note: stage server" not in proc.stderr  # warm: really served, not a fallback
        outputs[mode] = layout.version_dir(folder, {"name": "cnn", "version": "1"})
    cold, warm = outputs["cold"], outputs["warm"]
    a, b = (store.load_explanations(o / layout.EXPLANATIONS) for o in (cold, warm))
    assert a["explanations"].keys() == b["explanations"].keys() and a["explanations"]
    for label in a["explanations"]:
        assert torch.equal(a["explanations"][label].maps, b["explanations"][label].maps), label
    assert torch.equal(a["logits"], b["logits"])
    assert json.loads((cold / layout.METRICS).read_text()) == json.loads((warm / layout.METRICS).read_text())
    verdicts = [json.loads((o / layout.VERDICT).read_text()) for o in (cold, warm)]
    assert [v["status"] for v in verdicts] == [v["status"] for v in verdicts[:1]] * 2 == ["passed"] * 2
    assert verdicts[0]["checks"] == verdicts[1]["checks"]


def test_environment_output_and_status_pass_through(tmp_path, server):
    make_workspace(tmp_path)
    proc = run(tmp_path, "resolve", stage_env(server.env, XAI_TIMEOUT="soon"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("resolved cnn 1")  # the stage's stdout is the client's
    proc = run(tmp_path, "explain", stage_env(server.env, XAI_TIMEOUT="soon"))  # the client's env
    assert proc.returncode == 1
    assert "XAI_TIMEOUT must be a number of seconds" in proc.stderr and "Traceback" not in proc.stderr
    proc = run(tmp_path, "gate", stage_env(server.env), key="missing-v9")
    assert proc.returncode == 1 and "no version 'missing-v9'" in proc.stderr


def _processes_in(folder: Path) -> set[int]:
    """Processes whose working folder is ``folder`` (a stage's client and its runner)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str(folder):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _hanging_stage(folder: Path, server: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A stage blocked opening params.yaml (a FIFO nobody writes), and its runner's pid."""
    folder.mkdir()
    os.mkfifo(folder / "params.yaml")
    client = subprocess.Popen(
        [sys.executable, "-m", "pipelines.stages", "resolve", "--key", "cnn-v1"],
        cwd=folder,
        env=stage_env(server),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        others = _processes_in(folder) - {client.pid}
        if others:
            return client, others.pop()
        time.sleep(0.05)
    client.kill()
    raise AssertionError("the runner never started")


def test_a_killed_client_kills_its_stage(tmp_path, server):
    client, runner = _hanging_stage(tmp_path / "ws", server.env)
    assert os.getpgid(runner) == runner  # a session of its own: the supervisor can kill all of it
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _processes_in(tmp_path / "ws"):
        time.sleep(0.05)
    assert not _processes_in(tmp_path / "ws")


def test_a_stage_killed_by_a_signal_exits_128_plus_n(tmp_path, server):
    client, runner = _hanging_stage(tmp_path / "ws", server.env)
    os.kill(runner, signal.SIGKILL)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 128 + signal.SIGKILL
    assert "killed by signal 9" in err


def test_no_server_or_a_refusal_runs_the_stage_cold(tmp_path, server):
    make_workspace(tmp_path)
    proc = run(tmp_path, "resolve", stage_env({stage_server.ENV: str(tmp_path / "gone")}))
    assert proc.returncode == 0 and proc.stdout.startswith("resolved cnn 1")
    assert proc.stderr.count("\n") == 1 and "note: stage server unreachable" in proc.stderr
    # a client on other sources (another checkout) is refused: the server runs only its own code
    request = {**stage_server._request(["gate", "--key", "cnn-v1"]), "sources": str(tmp_path)}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(server.env[stage_server.ENV])
        stage_server._send_request(conn, request, [0, 1, 2])
        reply = conn.makefile("rb").readline().decode()
    assert reply.startswith("refused other sources")


def test_the_socket_is_private(server):
    path = Path(server.env[stage_server.ENV])
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o077 == 0


def test_the_client_imports_no_torch():
    """What ``python -m pipelines.stages`` loads before it hands the stage to the server."""
    code = "import sys, pipelines.stages; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
