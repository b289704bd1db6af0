"""The registry loop end to end, against a real local MLflow server (sqlite in tmp), the real
listener and worker processes, and the real DVC pipeline (``pipelines.api.run_version``) on a light
configuration: 4 probe images, saliency, localization + shortcut metrics, one gate check.

Set XAI_BURST_VERSIONS to change the size of the quick burst (the full 50-version burst is the
``slow`` test)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from registry_browser import chromium_path, inspect_html_artifact

ROOT = Path(__file__).resolve().parent.parent
MODEL = "shapes-cnn"
# saliency relevance mass on the object (8 'agree' probes): clean reference CNN 0.32-0.45 over
# retrainings, Clever Hans CNN 0.13 (it looks at the watermark)
LIGHT_PARAMS = {
    "probe": {
        "kind": "shapes",
        "n": 8,
        "size": 32,
        "seed": 1234,
        "watermark": "agree",
        "target": "predicted",
    },
    "fit_data": None,
    "batch_size": 32,
    "methods": {"saliency": {}},
    "metrics": {"localization": {"tolerance": 0}, "shortcut": {}},
    "reporters": {"json": {}, "html": {}},
    "gate": {
        "checks": [
            {
                "name": "saliency looks at the object",
                "method": "saliency",
                "metric": "localization.relevance_mass",
                "op": ">",
                "threshold": 0.25,
            }
        ]
    },
}
NEEDED_PLUGINS = {"gradient", "localization", "json_reporter", "html", "registry", "pipelines"}
MAX_ATTEMPTS = 2
pytestmark = pytest.mark.timeout(1800)


def light_env(needed: set[str] = NEEDED_PLUGINS) -> dict[str, str]:
    """The environment of the listener, worker and CLI: the embedded MLflow of the workspace, only
    the plugins the configuration uses (``needed``: each DVC stage starts faster)."""
    from importlib import metadata

    from core.plugins import BUILTIN_PLUGINS

    names = {m.rsplit(".", 1)[-1] for m in BUILTIN_PLUGINS}
    names |= {ep.name for ep in metadata.entry_points(group="xai")}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["XAI_DISABLED_PLUGINS"] = ",".join(sorted(names - needed))
    env["XAI_NO_PROGRESS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "2"
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started (as a crashed machine would lose them)."""
    try:
        parent = psutil.Process(proc.pid)
        family = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)


class Loop:
    """One workspace with MLflow, a listener and a worker, and helpers to drive them (versions of
    the registered model ``model``)."""

    def __init__(self, ws: Path, logs: Path, model: str = MODEL, plugins: set[str] = NEEDED_PLUGINS):
        from registry import server
        from registry.models import client_for

        self.ws, self.logs, self.model = ws, logs, model
        self.env = light_env(plugins)
        info = server.start(ws)
        self.uri = info["uri"]
        self.client = client_for(self.uri)
        self.port = server.free_port()
        self.listener: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.worker_starts = 0

    def xai(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "core.cli", *args],
            cwd=self.ws,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _spawn(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "core.cli", *args],
                cwd=self.ws,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def start_listener(self) -> None:
        log = self.logs / "listener.log"
        mark = log.stat().st_size if log.exists() else 0
        self.listener = self._spawn(
            [
                "listen",
                "-w",
                str(self.ws),
                "--port",
                str(self.port),
                "--register-webhook",
                "--poll-interval",
                "0",
                "--max-attempts",
                str(MAX_ATTEMPTS),
            ],
            log,
        )
        deadline = time.monotonic() + 300
        while b"MLflow webhook" not in log.read_bytes()[mark:]:
            assert self.listener.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (
                f"listener did not register its webhook:\n{self.log_tail('listener')}"
            )
            time.sleep(0.3)

    def start_worker(self, *extra: str) -> None:
        """``xai worker`` on this workspace with short back-off, lease and poll, plus ``extra``."""
        self.worker_starts += 1
        short = ["--backoff", "1", "--backoff-cap", "4", "--lease", "30", "--poll", "0.3"]
        self.worker = self._spawn(["worker", "-w", str(self.ws), *short, *extra], self.logs / "worker.log")

    def register(self, checkpoint: Path) -> str:
        from registry.models import register_checkpoint

        return str(register_checkpoint(self.client, self.model, checkpoint).version)

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(self.model, version).tags or {})

    def wait(self, versions: list[str], timeout: float, until: Any = None) -> dict[str, dict[str, str]]:
        """Wait until every version is done (or ``until(tags)`` holds); fail fast on a final failure."""
        until = until or (lambda t: t.get("xai.status") == "done")
        deadline = time.monotonic() + timeout
        pending = set(versions)
        result: dict[str, dict[str, str]] = {}
        while pending:
            for v in sorted(pending):
                tags = self.tags(v)
                if until(tags):
                    result[v] = tags
                    pending.discard(v)
                elif tags.get("xai.status") == "failed" and tags.get("xai.retry") == "no":
                    pytest.fail(f"version {v} failed: {tags.get('xai.error')}\n{self.log_tail('worker')}")
            if pending:
                assert time.monotonic() < deadline, (
                    f"versions {sorted(pending)} not done:\n{self.log_tail('worker')}"
                )
                for proc in (self.worker,):
                    assert proc is None or proc.poll() is None, self.log_tail("worker")
                time.sleep(1.0)
        return result

    def log_tail(self, name: str, n: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

    def queue(self):
        from registry.queue import Queue
        from registry.state import State

        return Queue(State(self.ws).queue_db)

    def runs_of(self, version: str, active_only: bool = True) -> list[Any]:
        from mlflow.entities import ViewType

        exp = self.client.get_experiment_by_name("xai-explanations")
        view = ViewType.ACTIVE_ONLY if active_only else ViewType.ALL
        return self.client.search_runs(
            [exp.experiment_id],
            f"tags.`xai.model` = '{self.model}' and tags.`xai.version` = '{version}'",
            run_view_type=view,
        )

    def close(self) -> None:
        from registry import server

        for proc in (self.listener, self.worker):
            if proc is not None and proc.poll() is None:
                kill_tree(proc)
        server.stop(self.ws)


def save_loaded(path: Path, lm: Any) -> Path:
    """A test model (``core.models.LoadedModel``) saved as the checkpoint a version registers."""
    from core.models import save_checkpoint

    return save_checkpoint(path, lm.model, lm.arch, lm.preprocess, lm.class_names, lm.meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, trained_cnn, clever_hans_cnn) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        label: save_loaded(folder / f"{label}.pt", lm)
        for label, lm in (("clean", trained_cnn), ("clever_hans", clever_hans_cnn))
    }


@contextlib.contextmanager
def running_loop(
    base: Path,
    params: dict[str, Any],
    model: str = MODEL,
    plugins: set[str] = NEEDED_PLUGINS,
    python_path: tuple[Path, ...] = (),
) -> Iterator[Loop]:
    """A workspace under ``base`` with ``params``, its MLflow, a listener and a worker (``python_path``
    put first on their PYTHONPATH); everything is stopped on exit."""
    from pipelines.params import write_params
    from pipelines.workspace import init_workspace

    ws = base / "ws"
    init_workspace(ws, commit=False)
    write_params(ws, {**params, "versions": {}})
    (base / "logs").mkdir()
    lp = Loop(ws, base / "logs", model, plugins)
    lp.env["PYTHONPATH"] = os.pathsep.join([*map(str, python_path), lp.env["PYTHONPATH"]])
    try:
        lp.start_listener()
        lp.start_worker()
        yield lp
    finally:
        lp.close()


@pytest.fixture(scope="module")
def loop(tmp_path_factory) -> Iterator[Loop]:
    with running_loop(tmp_path_factory.mktemp("registry-loop"), LIGHT_PARAMS) as lp:
        yield lp


@pytest.fixture(scope="module")
def first_version(loop, checkpoints) -> dict[str, Any]:
    version = loop.register(checkpoints["clean"])  # through the MLflow client; nothing else is done
    tags = loop.wait([version], timeout=900)[version]
    return {"version": version, "tags": tags}


def test_registering_a_version_is_all_it_takes(loop, first_version):
    version, tags = first_version["version"], first_version["tags"]
    assert tags["xai.status"] == "done" and tags["xai.gate"] == "passed"
    runs = loop.runs_of(version)
    assert [r.info.run_id for r in runs] == [tags["xai.run_id"]]  # exactly one run for the version
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["xai.gate"] == "passed"
    files = {a.path for a in loop.client.list_artifacts(run.info.run_id)}
    assert {"report.html", "results.json", "gate.json", "maps", "pipeline"} <= files
    maps = [a.path for a in loop.client.list_artifacts(run.info.run_id, "maps/saliency")]
    assert len(maps) == 8 and all(p.endswith(".png") for p in maps)
    metrics = run.data.metrics
    assert metrics["gate/passed"] == 1.0 and metrics["saliency/localization.relevance_mass"] > 0.25
    assert "saliency/localization.pointing_game" in metrics and "saliency/shortcut.share" in metrics
    verdict = json.loads(
        Path(loop.client.download_artifacts(run.info.run_id, "gate.json", str(loop.logs))).read_text()
    )
    assert verdict["passed"] is True and verdict["checks"][0]["metric"] == "localization.relevance_mass"
    q = loop.queue()
    [job] = q.find(MODEL, version)
    assert job.source == "webhook" and job.state == "done" and job.run_id == run.info.run_id
    q.close()


@pytest.mark.skipif(chromium_path() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_from_the_artifact_url_renders_in_chromium(loop, first_version):
    run_id = first_version["tags"]["xai.run_id"]
    url = f"{loop.uri}/get-artifact?path=report.html&run_uuid={run_id}"
    seen = inspect_html_artifact(loop.uri, url)
    assert seen["title"] == "Explanation report", seen
    assert seen["count"] == 16, seen  # 8 inputs + 8 saliency overlays
    assert seen["broken"] == [] and seen["external"] == [] and seen["errors"] == [], seen
    # the same harness does see a broken image and a script error (it is not blind)
    bad = loop.client.create_run(loop.client.get_experiment_by_name("Default").experiment_id).info.run_id
    page = loop.logs / "bad.html"
    page.write_text(
        '<html><body><img alt="x" src="data:image/png;base64,AAAA">'
        '<script>throw new Error("boom")</script></body></html>'
    )
    loop.client.log_artifact(bad, str(page))
    seen = inspect_html_artifact(loop.uri, f"{loop.uri}/get-artifact?path=bad.html&run_uuid={bad}")
    assert seen["broken"] == ["x"] and any("boom" in e for e in seen["errors"]), seen


def test_a_version_that_fails_the_gate_cannot_be_promoted(loop, first_version, checkpoints):
    clean = first_version["version"]
    hans = loop.register(checkpoints["clever_hans"])
    tags = loop.wait([hans], timeout=900)[hans]
    assert tags["xai.gate"] == "failed"
    refused = loop.xai("promote", MODEL, hans, "--alias", "champion")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "saliency looks at the object" in refused.stderr and "FAIL" in refused.stdout
    assert "champion" not in loop.client.get_registered_model(MODEL).aliases
    assert loop.xai("gate", MODEL, hans).returncode == 1
    promoted = loop.xai("promote", MODEL, clean, "--alias", "champion")
    assert promoted.returncode == 0, promoted.stderr
    assert loop.client.get_model_version_by_alias(MODEL, "champion").version == clean
    gate = loop.xai("gate", MODEL, clean)
    assert gate.returncode == 0 and "PASS" in gate.stdout
    assert loop.xai("gate", MODEL, "999").returncode == 2
    # the alias guard: setting the alias by hand on the failing version is undone
    loop.client.set_registered_model_alias(MODEL, "champion", hans)
    deadline = time.monotonic() + 120
    while loop.client.get_model_version_by_alias(MODEL, "champion").version != clean:
        assert time.monotonic() < deadline, loop.log_tail("listener")
        time.sleep(0.5)
    assert "moved back to version" in loop.tags(hans)["xai.alias_refused"]


def test_sync_catches_versions_registered_while_the_listener_was_down(loop, checkpoints):
    kill_tree(loop.listener)
    versions = [loop.register(checkpoints["clean"]) for _ in range(2)]
    time.sleep(3)
    q = loop.queue()
    assert all(q.find(MODEL, v) == [] for v in versions)  # nobody heard about them
    synced = loop.xai("sync", "-w", str(loop.ws))
    assert synced.returncode == 0, synced.stderr
    assert all(f"enqueued {MODEL} {v}" in synced.stdout for v in versions)
    loop.wait(versions, timeout=900)
    assert [q.find(MODEL, v)[0].source for v in versions] == ["sync", "sync"]
    again = loop.xai("sync", "-w", str(loop.ws))
    assert "0 enqueued" in again.stdout  # nothing left to catch
    q.close()
    loop.start_listener()


def test_bad_versions_fail_with_a_reason_are_retried_and_block_nothing(loop, checkpoints):
    from registry.models import ensure_registered_model
    from registry.state import config_hash

    # a version whose artifact does not load (registered by hand, bypassing register_checkpoint)
    run = loop.client.create_run(loop.client.get_experiment_by_name("Default").experiment_id)
    junk = loop.logs / "model"
    junk.mkdir()
    (junk / "checkpoint.pt").write_bytes(b"this is not a checkpoint")
    loop.client.log_artifacts(run.info.run_id, str(junk), "model")
    ensure_registered_model(loop.client, MODEL)
    broken = str(
        loop.client.create_model_version(MODEL, f"{run.info.artifact_uri}/model", run.info.run_id).version
    )
    # a job for a version that does not exist
    q = loop.queue()
    ghost, _ = q.enqueue(MODEL, "999", config_hash(loop.ws), source="test", max_attempts=MAX_ATTEMPTS)
    good = loop.register(checkpoints["clean"])
    loop.wait([good], timeout=900)
    tags = loop.wait([broken], timeout=900, until=lambda t: t.get("xai.retry") == "no")[broken]
    assert tags["xai.status"] == "failed" and tags["xai.attempts"] == f"{MAX_ATTEMPTS}/{MAX_ATTEMPTS}"
    assert "resolve" in tags["xai.error"] and "cannot load" in tags["xai.error"]
    deadline = time.monotonic() + 120
    while q.get(ghost.id).state != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    ghost_job = q.get(ghost.id)
    assert ghost_job.attempts == MAX_ATTEMPTS and "does not exist" in ghost_job.last_error
    retries = [e for e in q.events(ghost.id) if e["kind"] == "retry"]
    assert len(retries) == MAX_ATTEMPTS - 1 and "in " in retries[0]["detail"]  # backed off, then gave up
    log = loop.log_tail("worker", 200_000)
    assert f"{MODEL} 999 failed (attempt 1/{MAX_ATTEMPTS})" in log and "does not exist" in log
    assert f"{MODEL} {broken} failed (attempt {MAX_ATTEMPTS}/{MAX_ATTEMPTS})" in log and "giving up" in log
    assert loop.tags(good)["xai.status"] == "done"
    q.close()


def _burst(loop: Loop, checkpoint: Path, n: int) -> None:
    """n registrations at once; the worker is killed (with the DVC run it started) twice midway."""
    from concurrent.futures import ThreadPoolExecutor

    before = loop.worker_starts
    with ThreadPoolExecutor(8) as pool:  # registrations at once, their webhooks concurrent too
        versions = list(pool.map(lambda _: loop.register(checkpoint), range(n)))
    q = loop.queue()
    for kill_after in (n // 3, (2 * n) // 3):
        deadline = time.monotonic() + 300 + 60 * n
        while True:  # wait until the worker is inside a job, past `kill_after` done
            done = sum(1 for v in versions for j in q.find(MODEL, v) if j.state == "done")
            running = [j for v in versions for j in q.find(MODEL, v) if j.state == "running"]
            if done >= kill_after and running:
                break
            assert time.monotonic() < deadline, loop.log_tail("worker")
            time.sleep(0.2)
        time.sleep(1.5)  # let it get into the pipeline
        kill_tree(loop.worker)
        loop.start_worker()
    loop.wait(versions, timeout=300 + 60 * n)
    assert loop.worker_starts == before + 2
    for v in versions:
        [job] = q.find(MODEL, v)
        assert job.state == "done" and job.source == "webhook"
        assert sum(1 for e in q.events(job.id) if e["kind"] == "done") == 1
        runs = loop.runs_of(v)
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # exactly one run per version
        assert runs[0].info.run_id == job.run_id == loop.tags(v)["xai.run_id"]
    picked_up = [
        e
        for v in versions
        for j in q.find(MODEL, v)
        for e in q.events(j.id)
        if e["kind"] in ("orphan_released", "lease_expired")
    ]
    assert len(picked_up) >= 2  # both kills interrupted a job that was then taken over
    q.close()


def test_burst_with_the_worker_killed_twice(loop, checkpoints):
    _burst(loop, checkpoints["clean"], int(os.environ.get("XAI_BURST_VERSIONS", "3")))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_burst_of_50_with_the_worker_killed_twice(loop, checkpoints):
    _burst(loop, checkpoints["clean"], 50)


def test_write_params_lists_the_registry(loop):
    result = loop.xai("sync", "-w", str(loop.ws), "--write-params")
    assert result.returncode == 0, result.stderr
    listed = yaml.safe_load((loop.ws / "params.yaml").read_text())["versions"]
    registered = {str(mv.version) for mv in loop.client.search_model_versions(f"name='{MODEL}'")}
    assert {e["version"] for e in listed.values() if e["name"] == MODEL} == registered


def test_models_uris_load_weights_only(loop, first_version, monkeypatch, tmp_path):
    from core.cli import load_any_model
    from core.errors import ModelError
    from registry.models import ensure_registered_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", loop.uri)
    version = first_version["version"]
    loop.client.set_registered_model_alias(MODEL, "reviewed", version)
    by_version = load_any_model(f"models:/{MODEL}/{version}")
    by_alias = load_any_model(f"models:/{MODEL}@reviewed")
    assert by_version.arch == by_alias.arch == "deconvolve_cnn" and by_alias.class_names
    assert by_alias.meta["registry"]["version"] == version
    assert by_version.preprocess is not None
    with pytest.raises(ModelError, match="no such model version"):
        load_any_model(f"models:/{MODEL}/999")

    def version_with(files: dict[str, bytes], tags: dict[str, str] | None = None) -> str:
        run = loop.client.create_run(loop.client.get_experiment_by_name("Default").experiment_id)
        folder = tmp_path / run.info.run_id
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        loop.client.log_artifacts(run.info.run_id, str(folder), "model")
        ensure_registered_model(loop.client, "unsafe-models")
        return str(
            loop.client.create_model_version(
                "unsafe-models", f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags
            ).version
        )

    # a pickled pytorch-flavor model is refused unless explicitly allowed
    pickled = version_with({"MLmodel": b"flavors:\n  pytorch:\n    model_data: data\n", "data": b"x"})
    with pytest.raises(ModelError, match="pickled module"):
        load_any_model(f"models:/unsafe-models/{pickled}")
    # a checkpoint that does not match the hash recorded at registration is refused
    upload_run = loop.client.get_model_version(MODEL, version).run_id
    original = Path(loop.client.download_artifacts(upload_run, "model/checkpoint.pt", str(tmp_path)))
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    tampered = version_with(
        {"checkpoint.pt": bytes(data)}, tags={"xai.sha256": loop.tags(version)["xai.sha256"]}
    )
    with pytest.raises(ModelError, match="SHA-256"):
        load_any_model(f"models:/unsafe-models/{tampered}")


def test_mlflow_reporter_logs_a_plain_explain_run(loop, trained_cnn, tmp_path):
    from core import workflow
    from core.datasets import make_shapes

    ds = make_shapes(3, size=32, seed=7, watermark="agree")
    results = workflow.run(
        trained_cnn.model,
        trained_cnn.preprocess.normalize(ds.images),
        {"saliency": {}},
        images=ds.images,
        labels=ds.labels,
        masks=ds.masks,
        metrics=["localization"],
        reporters=["json", "html", "mlflow"],
        out_dir=tmp_path,
        progress=False,
        reporter_params={"mlflow": {"tracking_uri": loop.uri, "experiment": "reporter-test"}},
    )
    assert not results.failures, results.failures
    record = json.loads((tmp_path / "mlflow-run.json").read_text())
    run = loop.client.get_run(record["run_id"])
    assert run.info.status == "FINISHED" and "saliency/localization.pointing_game" in run.data.metrics
    files = {a.path for a in loop.client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.html", "maps"} <= files
    assert len(loop.client.list_artifacts(run.info.run_id, "maps/saliency")) == 3
