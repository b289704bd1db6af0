"""The attack corpus of issue 16 (security and bad input): each case is what an attacker or a
careless user did on loopback, and what must happen instead. Listener load cases are in
test_listener_load.py."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import torch

from core.models import DeConvolveCNN, save_checkpoint
from core.policy import evaluate
from core.preprocess import Preprocess

PASSWORD = "hunter2-s3cret"
URI = f"http://alice:{PASSWORD}@127.0.0.1:9/"


# -- 1. the gate fails closed ----------------------------------------------------------------------
def _results(ok_methods, failed_methods=(), extra_failures=()):
    metrics = {m: {"sanity.score": 0.1} for m in ok_methods}
    failures = [
        {"plugin": "p", "name": m, "kind": "exception", "message": "boom", "stage": "explain"}
        for m in failed_methods
    ]
    return {
        "meta": {"methods_requested": list(ok_methods) + list(failed_methods)},
        "metrics": metrics,
        "methods": {m: {} for m in ok_methods},
        "global_metrics": {},
        "failures": failures + list(extra_failures),
    }


WILDCARD = {
    "checks": [{"name": "all sane", "method": "*", "metric": "sanity.score", "op": "<", "threshold": 0.5}]
}


def test_gate_wildcard_covers_failed_methods():
    ok = [f"m{i}" for i in range(4)]
    failed = [f"f{i}" for i in range(8)]
    verdict = evaluate(WILDCARD, _results(ok, failed))
    assert verdict["status"] == "failed" and not verdict["passed"]
    assert len(verdict["checks"]) == 12
    assert sum(not c["passed"] for c in verdict["checks"]) == 8
    assert verdict["summary"] == "4 of 12 checks passed"


def test_gate_optional_wildcard_matching_nothing_fails():
    policy = {"checks": [{**WILDCARD["checks"][0], "required": False}]}
    verdict = evaluate(policy, {"metrics": {}, "methods": {}, "failures": []})
    assert verdict["status"] == "failed", verdict
    assert "matches no method" in verdict["checks"][0]["reason"]


def test_gate_empty_policy_fails_unless_allowed():
    results = _results(["m0"])
    assert evaluate({"checks": []}, results)["status"] == "failed"
    assert evaluate({"checks": []}, results)["passed"] is False
    allowed = evaluate({"checks": [], "allow_empty": True}, results)
    assert allowed["status"] == "passed" and "warning" in allowed


def test_gate_fails_on_model_with_non_finite_outputs():
    nan = {"plugin": "model", "name": "model", "kind": "nan", "message": "NaN outputs", "stage": "model"}
    verdict = evaluate(WILDCARD, _results(["m0"], extra_failures=[nan]))
    assert verdict["status"] == "failed" and "model failed" in verdict["checks"][0]["reason"]


def test_demo_policies_still_load_and_have_checks():
    from core.policy import load_policy

    root = Path(__file__).resolve().parent.parent
    for spec in (root / "policies" / "default.yaml", root / "params.yaml"):
        policy = load_policy(spec)
        assert policy.checks and not policy.allow_empty


# -- 2. secrets never written ----------------------------------------------------------------------
def test_worker_error_reason_hides_uri_password():
    from registry.worker import describe

    exc = ConnectionError(f"HTTPConnectionPool: Max retries exceeded with url {URI}api (Connection refused)")
    reason = describe(exc, URI).reason
    assert PASSWORD not in reason and "alice:***@127.0.0.1" in reason


def test_queue_last_error_hides_password(tmp_path):
    from registry.queue import Queue

    q = Queue(tmp_path / "q.db")
    q.enqueue("m", "1", "cfg")
    job = q.claim("w", 60)
    q.fail(job, f"cannot reach {URI} with api_key=sk-live-123", retryable=True, backoff=0)
    stored = q.get(job.id)
    assert PASSWORD not in stored.last_error and "sk-live-123" not in stored.last_error
    assert all(PASSWORD not in (e["detail"] or "") for e in q.events(job.id))


def test_registry_logs_hide_password():
    import io

    from registry.cli import setup_logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        setup_logging(False)
        logging.getLogger("xai.registry").error("MLflow unreachable at %s", URI)
    finally:
        logging.getLogger().removeHandler(handler)
    assert "MLflow unreachable" in stream.getvalue() and PASSWORD not in stream.getvalue()


@pytest.fixture(scope="module")
def tiny_run():
    from core.workflow import run

    torch.manual_seed(0)
    model = DeConvolveCNN(4).eval()
    return model, run(
        model, torch.rand(2, 3, 32, 32), {"saliency": {}}, metrics=[], reporters=[], progress=False
    )


@pytest.mark.parametrize("reporter,filename", [("json", "results.json"), ("html", "report.html")])
def test_reports_hide_describer_key_and_uri_password(tiny_run, tmp_path, reporter, filename):
    from core.plugins import get_host

    _, results = tiny_run
    results.meta["model"] = {"source": f"{URI}models/m/1", "note": "api_key=sk-live-123"}
    results.explanations["saliency"].params["describer"] = {"name": "openai", "api_key": "sk-live-123"}
    try:
        get_host().get("reporter", reporter)().write(results, tmp_path)
    finally:
        results.explanations["saliency"].params.pop("describer")
        results.meta.pop("model")
    text = (tmp_path / filename).read_text()
    assert "sk-live-123" not in text and PASSWORD not in text
    assert "127.0.0.1" in text  # the rest of the URI is still there


# -- 6. plugin-given names do not escape the workspace -----------------------------------------------
@pytest.mark.parametrize("key", ["../../escaped", "{abs}/escaped-abs", "a/../../b"])
def test_metric_key_cannot_write_outside_the_plots(tiny_run, tmp_path, key):
    from pipelines.stages import write_plots

    _, results = tiny_run
    key = key.format(abs=tmp_path / "outside")  # an absolute path of this test's own, never shared
    plots = tmp_path / "ws" / "plots"
    saved = dict(results.metrics)
    results.metrics = {"../saliency": {key: [0.1, 0.2, 0.3]}}
    try:
        written = write_plots(results, plots)
    finally:
        results.metrics = saved
    assert written and all(plots.resolve() in p.resolve().parents for p in written)
    outside = [p for p in tmp_path.rglob("*.csv") if plots.resolve() not in p.resolve().parents]
    assert outside == [] and not (tmp_path / "outside").exists()


# -- 3. the queue database fails in one line ---------------------------------------------------------
def _cli(capsys, *args):
    from core.cli import main

    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    return exited.value.code, [ln for ln in err.splitlines() if ln.strip()]


def test_xai_queue_on_a_corrupt_database_is_one_line(tmp_path, capsys):
    from registry.state import State

    db = State(tmp_path).ensure().queue_db
    db.write_bytes(b"this is not a sqlite database" * 100)
    code, lines = _cli(capsys, "queue", "-w", tmp_path)
    assert code == 2 and len(lines) == 1 and "corrupt" in lines[0]


def test_xai_worker_on_a_corrupt_database_is_one_line(tmp_path, capsys):
    from registry.state import State

    db = State(tmp_path).ensure().queue_db
    db.write_bytes(b"garbage" * 500)
    code, lines = _cli(capsys, "worker", "--once", "-w", tmp_path)
    assert code == 2 and len(lines) == 1 and "corrupt" in lines[0]


def test_xai_queue_lists_jobs_while_another_process_holds_the_write_lock(tmp_path, capsys):
    from registry.queue import Queue
    from registry.state import State

    db = State(tmp_path).ensure().queue_db
    Queue(db).enqueue("shapes-cnn", "3", "cfg")
    holder = sqlite3.connect(str(db), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        from core.cli import main

        main(["queue", "-w", str(tmp_path)])  # returns: exit status 0
        out = capsys.readouterr().out
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "shapes-cnn" in out and time.monotonic() - started < 10


def _fill(conn: sqlite3.Connection, table: str) -> None:
    """Make the database full, as a full disk does (SQLITE_FULL), with sqlite's own page limit:
    rows of shrinking size until not even a tiny one fits."""
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    for size in (2000, 200, 20, 1):
        with pytest.raises(sqlite3.OperationalError, match="full"):
            for i in range(100000):
                if table == "events":
                    conn.execute(
                        "INSERT INTO events(job_id, at, kind, detail) VALUES (NULL, 0, 'junk', ?)",
                        ("x" * size,),
                    )
                else:
                    conn.execute(
                        "INSERT INTO deliveries(id, received_at) VALUES (?, ?)",
                        (f"junk-{size}-{i}-" + "x" * size, time.time()),
                    )


def test_worker_survives_a_full_queue_database_and_retries_the_job(tmp_path):
    """A full disk at the queue (sqlite's SQLITE_FULL via max_page_count on the worker's own
    connection, not a mock): the attempt's failure cannot be recorded, the worker keeps running,
    and the job is claimed again once its lease runs out and space is back."""
    from registry.worker import Worker, WorkerConfig

    worker = Worker(tmp_path, WorkerConfig(lease=0.5, poll=0.05, backoff=0.05), uri="http://127.0.0.1:9/")
    worker.acquire()
    worker.queue.enqueue("bad/name", "1", "cfg", max_attempts=3)  # fails fast, no network
    job = worker.queue.claim(worker.name, worker.config.lease)
    _fill(worker.queue.conn, "events")
    assert worker.process(job) is False  # the failure could not be recorded; nothing raised
    assert worker.run(once=True) == 0  # nor does the loop die when it cannot claim
    assert worker.queue.get(job.id).state == "running"  # not recorded: the lease will run out
    worker.queue.conn.execute("DELETE FROM events WHERE kind='junk'")
    worker.queue.conn.execute("PRAGMA max_page_count=1073741823")
    time.sleep(0.7)
    assert worker.run(once=True) == 1
    again = worker.queue.get(job.id)
    assert again.attempts == 2 and again.state == "failed" and "bad/name" in (again.last_error or "")


# -- 3. the receiver answers, whatever the queue does ----------------------------------------------------
SECRET = "corpus-secret"


def _delivery(ts: str | None = None) -> tuple[bytes, dict[str, str]]:
    from registry.webhooks import sign

    body = json.dumps(
        {
            "entity": "model_version",
            "action": "created",
            "data": {"name": "shapes-cnn", "version": str(uuid.uuid4().int % 1000 + 1)},
        }
    ).encode()
    did, ts = str(uuid.uuid4()), ts or str(int(time.time()))
    return body, {
        "X-MLflow-Delivery-Id": did,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(SECRET, did, ts, body),
    }


def _post(server, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], dict]:
    import http.client

    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data or b"{}")


@pytest.fixture
def listener(tmp_path):
    from registry.webhooks import ListenerServer, Receiver

    rec = Receiver(tmp_path / "queue.db", SECRET, lambda: "cfg", busy_timeout=0.3)
    server = ListenerServer(("127.0.0.1", 0), rec)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, tmp_path / "queue.db"
    server.shutdown()
    server.server_close()


def test_huge_timestamp_is_400_not_a_dropped_connection(listener):
    server, _ = listener
    status, _, reply = _post(server, *_delivery(ts="9" * 401))
    assert status == 400 and "timestamp" in reply["error"]


def test_locked_queue_is_503_with_retry_after(listener):
    server, db = listener
    assert _post(server, *_delivery())[0] == 202
    holder = sqlite3.connect(str(db), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        status, headers, reply = _post(server, *_delivery())
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == 503 and int(headers["Retry-After"]) > 0 and "locked" in reply["error"]
    assert _post(server, *_delivery())[0] == 202  # and it recovers


@pytest.mark.parametrize("path", ["/webhook", "/health"])
def test_corrupt_queue_is_503_with_retry_after(listener, path):
    import http.client

    server, db = listener
    db.write_bytes(b"not a database at all" * 200)
    if path == "/webhook":
        status, headers, reply = _post(server, *_delivery())
    else:
        conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        status, headers, reply = resp.status, dict(resp.getheaders()), json.loads(resp.read())
    assert status == 503 and "Retry-After" in headers and "corrupt" in reply["error"]


def test_full_queue_is_503_with_retry_after(listener):
    server, _ = listener
    assert _post(server, *_delivery())[0] == 202
    with server.receiver.locked_queue() as queue:
        _fill(queue.conn, "deliveries")
    status, headers, reply = _post(server, *_delivery())
    assert status == 503 and "Retry-After" in headers and "full" in reply["error"]


# -- 7. `xai explain` bad input: one line, non-zero exit, good results kept ---------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from core.datasets import make_shapes
    from core.images import save_png

    folder = tmp_path_factory.mktemp("imgs")
    ds = make_shapes(2, size=32, seed=5)
    for i in range(2):
        save_png(ds.images[i], folder / f"img{i}.png")
    return folder


def _ckpt(path: Path, **overrides) -> Path:
    model = DeConvolveCNN(4)
    save_checkpoint(
        path, model, "deconvolve_cnn", Preprocess(32, [0.5] * 3, [0.25] * 3), ["a", "b", "c", "d"]
    )
    if overrides:
        payload = torch.load(path, weights_only=True)
        for key, value in overrides.items():
            if value is ...:
                payload.pop(key)
            else:
                payload[key] = value
        torch.save(payload, path)
    return path


def _explain(capsys, model, images, out, *extra):
    return _cli(
        capsys,
        "explain",
        "--model",
        model,
        "--images",
        images,
        "--methods",
        "saliency",
        "--metrics",
        "",
        "--reporters",
        "json",
        "--out",
        out,
        "--no-progress",
        *extra,
    )


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"arch": ...}, "'arch'"),
        ({"num_classes": "four"}, "num_classes"),
        ({"num_classes": 1e12}, "num_classes"),
        ({"num_classes": 10**12}, "num_classes"),
        ({"preprocess": {"size": 30000, "mean": [0.5] * 3, "std": [0.25] * 3}}, "size"),
        ({"arch": "resnet18"}, "do not fit"),
    ],
    ids=["no-arch", "classes-text", "classes-1e12-float", "classes-1e12", "size-30000", "wrong-arch"],
)
def test_bad_checkpoint_is_one_line(capsys, tmp_path, images, overrides, expected):
    model = _ckpt(tmp_path / "m.pt", **overrides)
    code, lines = _explain(capsys, model, images, tmp_path / "out")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


@pytest.mark.parametrize(
    "extra,expected",
    [
        (("--preprocess", '{"size": -5, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}'), "size"),
        (("--device", "cuda:7"), "--device"),
        (("--device", "potato"), "--device"),
    ],
    ids=["preprocess-size-negative", "device-cuda7", "device-potato"],
)
def test_bad_option_is_one_line(capsys, tmp_path, images, extra, expected):
    if extra[1] == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    code, lines = _explain(capsys, _ckpt(tmp_path / "m.pt"), images, tmp_path / "out", *extra)
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines


def test_config_that_is_a_list_is_one_line(capsys, tmp_path, images):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- saliency\n- grad_cam\n")
    code, lines = _explain(capsys, _ckpt(tmp_path / "m.pt"), images, tmp_path / "out", "--config", cfg)
    assert code == 2 and len(lines) == 1 and "--config" in lines[0], lines


def test_out_that_is_a_file_is_one_line(capsys, tmp_path, images):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    code, lines = _explain(capsys, _ckpt(tmp_path / "m.pt"), images, out)
    assert code == 2 and len(lines) == 1 and "--out" in lines[0] and out.read_text() == "keep me", lines


def test_fake_torchscript_is_one_line(capsys, tmp_path, images):
    """A TorchScript archive whose code is not TorchScript (torch's error spans several lines)."""
    import warnings

    real, fake = tmp_path / "real.pt", tmp_path / "fake.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(real))
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(fake, "w") as out:
        for name in src.namelist():
            data = src.read(name)
            if "/code/" in name and name.endswith(".py"):
                data = (
                    b"class Linear(Module):\n  def forward(self, x):\n    return this is not torchscript(\n"
                )
            out.writestr(name, data)
    code, lines = _explain(capsys, fake, images, tmp_path / "out")
    assert code == 2 and len(lines) == 1 and "TorchScript" in lines[0], lines


def test_file_name_with_newline_cannot_forge_an_error_line(capsys, tmp_path, images):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in images.glob("*.png"):
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "x\nerror: forged line.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    code, lines = _explain(capsys, _ckpt(tmp_path / "m.pt"), folder, out)
    assert code == 1
    assert not any(ln.startswith("error: forged") for ln in lines), lines
    assert sum(ln.startswith("error: ") for ln in lines) == 1 and "\\n" in lines[0]
    results = json.loads((out / "results.json").read_text())
    assert sorted(r["name"] for r in results["images"]) == ["img0.png", "img1.png"]


def test_model_with_nan_outputs_still_writes_results(capsys, tmp_path, images):
    model = DeConvolveCNN(4)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    path = save_checkpoint(
        tmp_path / "nan.pt",
        model,
        "deconvolve_cnn",
        Preprocess(32, [0.5] * 3, [0.25] * 3),
        ["a", "b", "c", "d"],
    )
    out = tmp_path / "out"
    code, lines = _explain(capsys, path, images, out)
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    kinds = {(f["stage"], f["kind"]) for f in results["failures"]}
    assert ("model", "nan") in kinds and not any(f["stage"] == "report" for f in results["failures"])
    assert any("not finite" in ln for ln in lines)
