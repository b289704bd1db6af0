"""Issue 16, items 4-5: plugins that must be stoppable run in a child process killed at their time
limit (``isolate="process"``); the model is checked after every plugin call and restored before
the next method; pipeline stages get a time limit by default; ``dvc repro`` dies with its caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

from core.api import explain
from core.engine import Engine
from core.isolation import DEFAULT_TIMEOUT
from tests.test_plugin_host import _host_with, _module
from xai_plugins import Explainer

ROOT = Path(__file__).resolve().parent.parent
PID_FILE = "XAI_TEST_PID_FILE"


def _note_pid() -> None:
    Path(os.environ[PID_FILE]).write_text(str(os.getpid()))


class CatchesTimeout(Explainer):
    """Swallows the time-out the thread isolation raises and goes on writing heartbeats."""

    name = "catches_timeout"

    def explain(self, model, inputs, targets):
        _note_pid()
        beats = Path(os.environ[PID_FILE] + ".beats")
        for _ in range(3000):
            try:
                with beats.open("a") as fh:
                    fh.write(".")
                time.sleep(0.01)
            except BaseException:  # noqa: BLE001, S110 - the point of this plugin
                pass
        return torch.zeros_like(inputs)


class BlocksInC(Explainer):
    """Blocks in one C call (no Python bytecode runs, so no asynchronous exception lands)."""

    name = "blocks_in_c"

    def explain(self, model, inputs, targets):
        _note_pid()
        time.sleep(8)
        return torch.zeros_like(inputs)


class ZeroesWeights(Explainer):
    """Zeroes every parameter through ``.data`` (the tensors' version counters do not move)."""

    name = "zeroes_weights"

    def explain(self, model, inputs, targets):
        for p in model.parameters():
            p.data.zero_()
        return torch.ones_like(inputs)


class ReplacesBuffer(Explainer):
    """Swaps a parameter for a new tensor instead of writing into it."""

    name = "replaces_parameter"

    def explain(self, model, inputs, targets):
        first = next(m for m in model.modules() if isinstance(getattr(m, "weight", None), torch.nn.Parameter))
        first.weight = torch.nn.Parameter(torch.zeros_like(first.weight))
        return torch.ones_like(inputs)


class Raises(Explainer):
    name = "raises_in_child"

    def explain(self, model, inputs, targets):
        raise ValueError("bad input, one line")


@pytest.fixture
def pid_file(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "plugin.pid"
    monkeypatch.setenv(PID_FILE, str(path))
    return path


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_process_isolation_kills_a_plugin_that_catches_the_timeout(functional_relu_cnn, images32, pid_file):
    host = _host_with(_module("stubborn", CatchesTimeout))
    out = Engine(host=host, progress=False, timeout=1.0).run(
        functional_relu_cnn, images32, ["catches_timeout", "saliency"], isolate="process"
    )
    assert [(f.name, f.kind) for f in out.failures] == [("catches_timeout", "timeout")]
    assert "saliency" in out.explanations, "the run goes on with the next method"
    pid = int(pid_file.read_text())
    assert pid != os.getpid() and _gone(pid), "the plugin ran in a child process that was killed"
    beats = Path(str(pid_file) + ".beats")
    size = beats.stat().st_size
    time.sleep(0.5)
    assert beats.stat().st_size == size, "nothing of the plugin still runs"


def test_process_isolation_stops_a_plugin_blocked_in_c(functional_relu_cnn, images32, pid_file):
    host = _host_with(_module("blocking", BlocksInC))
    start = time.monotonic()
    out = Engine(host=host, progress=False, timeout=0.5).run(
        functional_relu_cnn,
        images32,
        [{"method": "blocks_in_c", "params": {"isolate": "process"}}, "saliency"],
    )
    elapsed = time.monotonic() - start
    assert [(f.name, f.kind) for f in out.failures] == [("blocks_in_c", "timeout")]
    assert elapsed < 5.0, (
        f"the run waited {elapsed:.1f} s for a plugin blocked in C (limit 0.5 s, it sleeps 8 s)"
    )
    assert "saliency" in out.explanations
    assert _gone(int(pid_file.read_text()))


def test_process_isolation_gives_the_same_maps_and_one_line_errors(functional_relu_cnn, images32):
    here = explain(functional_relu_cnn, images32, method="grad_cam")
    child = explain(functional_relu_cnn, images32, method="grad_cam", isolate="process")
    assert torch.equal(here.maps, child.maps) and torch.equal(here.attributions, child.attributions)
    host = _host_with(_module("raiser", Raises))
    out = Engine(host=host, progress=False).run(
        functional_relu_cnn, images32, ["raises_in_child"], isolate="process"
    )
    (failure,) = out.failures
    assert failure.kind == "exception" and "ValueError: bad input, one line" in failure.message
    assert "\n" not in failure.message


def test_unknown_isolation_mode_is_a_config_failure(functional_relu_cnn, images32):
    out = Engine(progress=False).run(
        functional_relu_cnn,
        images32,
        [{"method": "saliency", "params": {"isolate": "container"}}, "grad_cam"],
    )
    assert [(f.name, f.kind) for f in out.failures] == [("saliency", "config")]
    assert "thread, process" in out.failures[0].message and "grad_cam" in out.explanations


@pytest.mark.parametrize("bad", [ZeroesWeights, ReplacesBuffer])
def test_a_plugin_that_changes_the_model_fails_and_later_methods_see_it_intact(
    functional_relu_cnn, images32, bad
):
    params = {k: v.detach().clone() for k, v in functional_relu_cnn.state_dict().items()}
    alone = Engine(progress=False).run(functional_relu_cnn, images32, ["occlusion"]).explanations["occlusion"]
    host = _host_with(_module("vandal", bad))
    out = Engine(host=host, progress=False).run(functional_relu_cnn, images32, [bad.name, "occlusion"])
    assert [(f.name, f.kind) for f in out.failures] == [(bad.name, "model")]
    assert "restored" in out.failures[0].message and "\n" not in out.failures[0].message
    after = out.explanations["occlusion"]
    assert after.maps.abs().sum() > 0
    assert torch.equal(after.maps, alone.maps), "occlusion after the bad plugin equals occlusion alone"
    now = functional_relu_cnn.state_dict()
    assert all(torch.equal(now[k], v) for k, v in params.items()), "the caller gets its model back"


def test_a_write_through_data_between_runs_is_not_undone(functional_relu_cnn, images32):
    """The snapshot is checked by content, so a user's own ``.data`` edit is the new baseline."""
    explain(functional_relu_cnn, images32, method="saliency")
    p = next(functional_relu_cnn.parameters())
    p.data.mul_(2.0)
    wanted = p.detach().clone()
    explain(functional_relu_cnn, images32, method="saliency")
    assert torch.equal(p.detach(), wanted)


# -- pipeline stages: a time limit by default ------------------------------------------------------
def _stage_context(tmp_path: Path, extra: str = ""):
    from pipelines.stages import StageContext

    (tmp_path / "params.yaml").write_text(
        textwrap.dedent("""\
        versions:
          m-v1: {name: m, version: '1', uri: model.pt}
        """)
        + extra
    )
    return StageContext("explain", "m-v1", tmp_path)


def test_stage_timeout_defaults_to_the_engine_limit(tmp_path, monkeypatch):
    monkeypatch.delenv("XAI_TIMEOUT", raising=False)
    assert _stage_context(tmp_path).timeout == DEFAULT_TIMEOUT


def test_stage_timeout_from_params_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv("XAI_TIMEOUT", raising=False)
    assert _stage_context(tmp_path, "timeout: 5\n").timeout == 5.0
    assert _stage_context(tmp_path, "timeout: 0\n").timeout is None
    monkeypatch.setenv("XAI_TIMEOUT", "7")
    assert _stage_context(tmp_path, "timeout: 5\n").timeout == 7.0
    monkeypatch.setenv("XAI_TIMEOUT", "none")
    assert _stage_context(tmp_path).timeout is None


def test_shipped_params_set_the_default_limit():
    import yaml

    from pipelines.workspace import TEMPLATES

    for path in (ROOT / "params.yaml", Path(TEMPLATES) / "params.yaml"):
        assert yaml.safe_load(path.read_text())["timeout"] == DEFAULT_TIMEOUT, path


def test_bad_stage_timeout_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_TIMEOUT", "soon")
    from core.errors import XAIError

    with pytest.raises(XAIError, match="XAI_TIMEOUT must be a number of seconds"):
        _stage_context(tmp_path).timeout  # noqa: B018


# -- dvc repro dies with its caller ----------------------------------------------------------------
STAGE = """\
import os, pathlib, time
pathlib.Path("stage.pid").write_text(str(os.getpid()))
while pathlib.Path("hang").exists():
    time.sleep(0.1)
pathlib.Path("out.txt").write_text("done")
"""

# The caller takes Ctrl-C as a foreground process does: a process started in the background by a
# non-interactive shell (``make test &``, nohup) inherits SIGINT ignored, and would not see it.
CALLER = """\
import signal, sys
from pathlib import Path
from pipelines.api import run_dvc
signal.signal(signal.SIGINT, signal.default_int_handler)
print(run_dvc(Path(sys.argv[1]), ["repro"]), flush=True)
"""


@pytest.fixture
def hanging_workspace(tmp_path) -> Path:
    """A real DVC repository (no git) whose one stage waits while the file ``hang`` exists."""
    from pipelines.workspace import dvc_command, dvc_env

    ws = tmp_path / "ws"
    ws.mkdir()
    subprocess.run(dvc_command("init", "--no-scm", "-q"), cwd=ws, env=dvc_env(), check=True)
    (ws / "stage.py").write_text(STAGE)
    (ws / "dvc.yaml").write_text(
        textwrap.dedent(f"""\
        stages:
          wait:
            cmd: {sys.executable} stage.py
            deps: [stage.py]
            outs: [out.txt]
        """)
    )
    (ws / "hang").write_text("")
    return ws


def _start_caller(ws: Path) -> tuple[subprocess.Popen, int]:
    """A real caller process running ``run_dvc(ws, ["repro"])``; returns it and the stage's pid."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    caller = subprocess.Popen(
        [sys.executable, "-c", CALLER, str(ws)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (ws / "stage.pid").exists():
        assert caller.poll() is None, caller.stdout.read()
        assert time.monotonic() < deadline, "the stage never started"
        time.sleep(0.1)
    time.sleep(0.2)
    return caller, int((ws / "stage.pid").read_text())


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_dvc_repro_dies_with_its_caller_and_the_next_run_proceeds(hanging_workspace, sig):
    from pipelines.api import run_dvc

    caller, stage_pid = _start_caller(hanging_workspace)
    group = [p.pid for p in psutil.Process(caller.pid).children(recursive=True)]
    assert stage_pid in group
    try:
        caller.send_signal(sig)
        caller.wait(30)
        alive = _wait_gone(group)
    finally:
        for pid in group:  # never leave the hanging stage behind, even when the test fails
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not alive, f"dvc or its stage outlived the caller killed by {sig.name}: {alive}"
    (hanging_workspace / "hang").unlink()
    code, output = run_dvc(hanging_workspace, ["repro"], timeout=120)
    assert code == 0 and "is busy" not in output, output
    assert (hanging_workspace / "out.txt").read_text() == "done"


@pytest.mark.parametrize("holder", ["gone", "zombie", "cut_off"])
def test_a_stale_dvc_lock_of_a_dead_process_does_not_block(hanging_workspace, holder):
    """The lock entries dvc leaves when it is killed name a process that no longer exists, or a
    zombie nobody reaps (a killed dvc re-parented to a container's PID 1 that does not wait), or the
    file is cut off (dvc killed while it rewrote it: CI saw "JSON structure is corrupted")."""
    import json

    from pipelines.api import run_dvc

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    if holder == "gone":
        dead.wait()
    else:  # not waited for: it stays a zombie of this process while the next run starts
        deadline = time.monotonic() + 30
        while psutil.Process(dead.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    tmp = hanging_workspace / ".dvc" / "tmp"
    tmp.mkdir(exist_ok=True)
    out = str(hanging_workspace / "out.txt")
    lock = json.dumps({"write": {out: {"pid": dead.pid, "cmd": "dvc repro"}}, "read": {}})
    (tmp / "rwlock").write_text(lock[: len(lock) // 2] if holder == "cut_off" else lock)
    (hanging_workspace / "hang").unlink()
    code, output = run_dvc(hanging_workspace, ["repro"], timeout=120)
    assert code == 0 and "is busy" not in output, output
    if holder == "zombie":
        assert psutil.Process(dead.pid).status() == psutil.STATUS_ZOMBIE  # still there: it was skipped
        dead.wait()


def test_thread_isolation_runs_in_the_callers_thread_and_leaves_nothing_pending():
    """The plugin runs in the calling thread (a fresh thread's malloc arena page-faults every large
    activation in again: AttnLRP on ViT-B/16 took 12 s there against 8 s); a call that ends in time
    leaves no time-out behind to fire into the caller later."""
    import threading

    from core.isolation import call_with_timeout

    assert call_with_timeout(threading.get_ident, 5.0) == threading.get_ident()
    for _ in range(20):
        call_with_timeout(lambda: time.sleep(0.01), 0.2)
    time.sleep(0.8)  # past every deadline and a retry: nothing is raised here


def test_thread_isolation_sends_the_timeout_again_to_a_plugin_that_swallowed_it():
    from core.errors import PluginError, PluginTimeout
    from core.isolation import call_with_timeout

    caught = []

    def swallows_once():
        try:
            while True:
                time.sleep(0.01)
        except PluginTimeout:
            caught.append(time.monotonic())
        while True:  # goes on: the retry stops it
            time.sleep(0.01)

    start = time.monotonic()
    with pytest.raises(PluginError, match="time limit"):
        call_with_timeout(swallows_once, 0.2)
    assert len(caught) == 1 and time.monotonic() - start < 3.0
