"""The Ray backend (``xai worker --backend ray``) against a local Ray cluster the test starts itself,
the real MLflow server, worker process and DVC pipeline (tests/test_registry_loop.py's ``Loop``).

- the same maps, metrics and verdict as the local backend (deterministic methods: bit-identical),
  and ``dvc repro`` after the Ray run has nothing to redo;
- an actor process killed mid-shard: Ray restarts it and retries the shard; the job completes once;
- the driver (the worker) killed with its pipeline: the lease is released, the next worker takes
  the job again and completes it once;
- an unreachable address and GPUs the cluster does not have: one line, exit 2;
- a shard that raises: the job fails with the reason in the tag and is retried.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_registry_loop import LIGHT_PARAMS, MODEL, NEEDED_PLUGINS, Loop, kill_tree, save_loaded

ray = pytest.importorskip("ray", reason="the Ray backend needs the ray extra")

ROOT = Path(__file__).resolve().parent.parent
# deterministic methods and metrics; occlusion makes a shard long enough to be interrupted
PARAMS = {
    **LIGHT_PARAMS,
    "batch_size": 4,
    "methods": {"saliency": {}, "grad_cam": {}, "occlusion": {"window": 4, "stride": 1}},
    "metrics": {"localization": {"tolerance": 0}, "shortcut": {}},
}
PLUGINS = NEEDED_PLUGINS | {"cam", "perturbation"}
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray (2 CPUs); its processes import this tree, with only the plugins the test uses."""
    from core.plugins import BUILTIN_PLUGINS

    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "XAI_DISABLED_PLUGINS", "XAI_NO_PROGRESS")}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), saved["PYTHONPATH"] or ""]).rstrip(os.pathsep)
    os.environ["XAI_DISABLED_PLUGINS"] = ",".join(
        sorted({m.rsplit(".", 1)[-1] for m in BUILTIN_PLUGINS} - PLUGINS)
    )
    os.environ["XAI_NO_PROGRESS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, namespace="xai", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RayLoop(Loop):
    address = ""

    def start_worker(self, *extra: str) -> None:
        super().start_worker("--backend", "ray", "--ray-address", self.address, "--actors", "2", *extra)

    def actors(self) -> list:
        pid = self.worker.pid
        return [ray.get_actor(f"xai-worker-{pid}-{i}", namespace="xai") for i in range(2)]

    def wait_busy(self, timeout: float = 300) -> list:
        """The pool's actors once one of them is inside a shard."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.worker.poll() is None, self.log_tail("worker")
            try:
                actors = self.actors()
                busy = [a for a in actors if ray.get(a.busy.remote(), timeout=10)]
                if busy:
                    return busy
            except ValueError:  # the pool is not up yet
                pass
            time.sleep(0.05)
        pytest.fail(f"no actor got a shard:\n{self.log_tail('worker')}")


@pytest.fixture(scope="module")
def rloop(tmp_path_factory, cluster):
    from pipelines.params import write_params
    from pipelines.workspace import init_workspace

    base = tmp_path_factory.mktemp("ray-loop")
    ws = base / "ws"
    init_workspace(ws, commit=False)
    write_params(ws, {**PARAMS, "versions": {}})
    logs = base / "logs"
    logs.mkdir()
    lp = RayLoop(ws, logs)
    lp.env["XAI_DISABLED_PLUGINS"] = os.environ["XAI_DISABLED_PLUGINS"]
    lp.address = cluster
    try:
        lp.start_listener()
        lp.start_worker()
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained_cnn) -> Path:
    return save_loaded(tmp_path_factory.mktemp("models") / "clean.pt", trained_cnn)


def _once(loop: Loop, version: str) -> None:
    q = loop.queue()
    [job] = q.find(MODEL, version)
    assert job.state == "done"
    assert sum(1 for e in q.events(job.id) if e["kind"] == "done") == 1
    runs = loop.runs_of(version)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].info.run_id == job.run_id == loop.tags(version)["xai.run_id"]
    q.close()


@pytest.mark.slow  # a Ray cluster + MLflow + DVC loop: minutes on 2 cores (make test-all)
def test_same_results_as_the_local_backend_and_dvc_has_nothing_to_redo(rloop, checkpoint, tmp_path):
    from pipelines.api import collect, run_dvc, run_version
    from pipelines.params import write_params
    from pipelines.workspace import init_workspace

    version = rloop.register(checkpoint)
    tags = rloop.wait([version], timeout=600)[version]
    _once(rloop, version)
    local_ws = tmp_path / "local"
    init_workspace(local_ws, commit=False)
    write_params(local_ws, {**PARAMS, "versions": {}})
    env = {"XAI_DISABLED_PLUGINS": rloop.env["XAI_DISABLED_PLUGINS"], "XAI_NO_PROGRESS": "1"}
    local = run_version(local_ws, MODEL, version, uri=str(checkpoint), env=env)
    remote = collect(rloop.ws, local["key"])
    a = torch.load(Path(local["out_dir"]) / "explanations.pt", weights_only=True)
    b = torch.load(Path(remote["out_dir"]) / "explanations.pt", weights_only=True)
    assert set(a["methods"]) == set(b["methods"]) == set(PARAMS["methods"]) and not b["failures"]
    for label in PARAMS["methods"]:
        for field in ("attributions", "maps", "targets"):
            assert torch.equal(a["methods"][label][field], b["methods"][label][field]), (label, field)
    assert torch.equal(a["logits"], b["logits"]) and torch.equal(a["targets"], b["targets"])
    assert local["metrics"] == remote["metrics"]
    assert {k: v for k, v in local["gate"].items() if k not in ("model", "out_dir", "results")} == {
        k: v for k, v in remote["gate"].items() if k not in ("model", "out_dir", "results")
    }
    assert tags["xai.gate"] == local["gate"]["status"]
    code, output = run_dvc(rloop.ws, ["status", f"gate@{local['key']}"], rloop.env)
    assert code == 0 and "up to date" in output.lower(), output  # DVC's record is the Ray run's


@pytest.mark.slow  # a Ray cluster + MLflow + DVC loop: minutes on 2 cores (make test-all)
def test_an_actor_killed_mid_shard_is_restarted_and_the_job_completes_once(rloop, checkpoint):
    version = rloop.register(checkpoint)
    [victim, *_] = rloop.wait_busy()
    pid = ray.get(victim.pid.remote())
    os.kill(pid, signal.SIGKILL)
    rloop.wait([version], timeout=600)
    _once(rloop, version)
    assert ray.get(victim.pid.remote(), timeout=120) != pid  # the same actor, a new process


@pytest.mark.slow  # a Ray cluster + MLflow + DVC loop: minutes on 2 cores (make test-all)
def test_the_driver_killed_the_job_is_taken_again_and_completes_once(rloop, checkpoint):
    version = rloop.register(checkpoint)
    rloop.wait_busy()
    kill_tree(rloop.worker)  # the worker, its dvc and stage processes (its actors die with it)
    rloop.start_worker()
    rloop.wait([version], timeout=600)
    _once(rloop, version)
    q = rloop.queue()
    [job] = q.find(MODEL, version)
    assert any(e["kind"] in ("orphan_released", "lease_expired") for e in q.events(job.id))
    q.close()


def test_a_shard_that_raises_is_one_line_naming_the_stage(cluster):
    """What the stage prints (and the worker tags, then retries with backoff) when a shard raises."""
    from core.errors import XAIError
    from pipelines.ray_backend import _gather

    @ray.remote(num_cpus=0)  # the pool of another test may hold every CPU
    def shard():
        raise ValueError("probe image 3 is empty")

    with pytest.raises(XAIError) as err:
        _gather(ray, [shard.remote()], "explain (2 shard(s))")
    assert (
        str(err.value) == "explain (2 shard(s)) on the Ray cluster failed: ValueError: probe image 3 is empty"
    )


def test_unreachable_address_and_missing_gpus_are_one_line_exit_2(rloop, cluster):
    for extra in (["--ray-address", "127.0.0.1:1"], ["--ray-address", cluster, "--gpus-per-actor", "1"]):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "core.cli",
                "worker",
                "-w",
                str(rloop.ws) + "-other",
                "--backend",
                "ray",
                "--once",
                *extra,
            ],
            env=rloop.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and lines and lines[-1].startswith("error: "), proc.stderr
        assert "Traceback" not in proc.stderr
        assert ("unreachable at 127.0.0.1:1" if "127.0.0.1:1" in extra else "has 0 GPU(s)") in lines[-1]


def test_shards_merge_in_probe_order():
    from core.types import Explanation
    from pipelines.ray_backend import merge_explanations, shard_bounds

    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)] and shard_bounds(2, 4) == [(0, 1), (1, 2)]
    full = torch.arange(10.0).view(10, 1, 1, 1)
    shards = []
    for a, b in shard_bounds(10, 3):
        exp = Explanation(
            "m",
            full[a:b],
            full[a:b, 0],
            torch.arange(a, b),
            extras={"text": [str(i) for i in range(a, b)], "layer": "conv"},
        )
        shards.append(
            {"explanations": {"m": exp}, "failures": [], "targets": torch.arange(a, b), "logits": None}
        )
    out = merge_explanations(shards, [4, 3, 3], ["m"])
    assert torch.equal(out.explanations["m"].attributions, full) and torch.equal(
        out.targets, torch.arange(10)
    )
    assert out.explanations["m"].extras == {"text": [str(i) for i in range(10)], "layer": "conv"}
    del shards[1]["explanations"]["m"]
    out = merge_explanations(shards, [4, 3, 3], ["m"])
    assert not out.explanations and [f.name for f in out.failures] == ["m"]  # no map with holes
