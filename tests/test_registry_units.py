"""The registry loop's parts that need no MLflow server: names, the durable queue, the signed-webhook
receiver over real HTTP, and a worker facing an unreachable MLflow."""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from registry.names import InvalidNameError, check_name, check_version, parse_models_uri
from registry.queue import Queue
from registry.webhooks import ListenerServer, Receiver, sign, verify

SECRET = "test-secret-0123456789"


# -- names ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "../etc",
        "..",
        "a/b",
        "a\\b",
        "a..b",
        "",
        ".hidden",
        "-rf",
        "x" * 101,
        "name with space",
        "nul\x00",
        "models:/x",
        None,
        3,
    ],
)
def test_unsafe_model_names_are_refused(name):
    with pytest.raises(InvalidNameError):
        check_name(name)


@pytest.mark.parametrize("version", ["0", "01", "1.0", "-1", "1/2", "../1", "", "1e3", None, True])
def test_bad_versions_are_refused(version):
    with pytest.raises(InvalidNameError):
        check_version(version)


def test_models_uris():
    assert parse_models_uri("models:/shapes-cnn/3").version == "3"
    ref = parse_models_uri("models:/shapes_cnn.v2@champion")
    assert (ref.name, ref.alias, ref.version) == ("shapes_cnn.v2", "champion", None)
    for bad in ("models:/../x/1", "models:/a/b/1", "models:/a@v1", "runs:/abc/model", "models:/a/1@x"):
        with pytest.raises(InvalidNameError):
            parse_models_uri(bad)


# -- the queue -----------------------------------------------------------------------------------
@pytest.fixture
def queue(tmp_path) -> Queue:
    q = Queue(tmp_path / "queue.db")
    yield q
    q.close()


def test_one_job_per_version_and_config(queue):
    job, created = queue.enqueue("m", "1", "cfg-a")
    again, created_again = queue.enqueue("m", "1", "cfg-a", source="sync")
    other, created_other = queue.enqueue("m", "1", "cfg-b")
    assert created and not created_again and created_other
    assert again.id == job.id != other.id
    assert queue.counts() == {"queued": 2}
    assert queue.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_lease_expiry_hands_the_job_to_another_worker(queue):
    queue.enqueue("m", "1", "c")
    first = queue.claim("w1", lease_s=0.2)
    assert first is not None and queue.claim("w2", lease_s=5) is None  # held
    time.sleep(0.3)
    second = queue.claim("w2", lease_s=5)
    assert second is not None and second.id == first.id and second.token != first.token
    assert second.attempts == 2
    assert not queue.complete(first, "run-old")  # the worker that lost its lease cannot finish it
    assert not queue.heartbeat(first, 5)
    assert queue.complete(second, "run-new")
    assert queue.get(first.id).state == "done" and queue.get(first.id).run_id == "run-new"
    kinds = [e["kind"] for e in queue.events(first.id)]
    assert kinds.count("done") == 1 and "lease_expired" in kinds and "stale_complete" in kinds


def test_failures_back_off_then_fail_for_good(queue):
    queue.enqueue("m", "1", "c", max_attempts=2)
    job = queue.claim("w", 30)
    after = queue.fail(job, "resolve: cannot load", backoff=30)
    assert after.state == "queued" and after.next_run_at > time.time() + 25 and after.last_error
    assert queue.claim("w", 30) is None  # not due yet
    queue.conn.execute("UPDATE jobs SET next_run_at=0")
    job = queue.claim("w", 30)
    final = queue.fail(job, "resolve: cannot load again", backoff=30)
    assert final.state == "failed" and final.attempts == 2
    assert queue.retry_failed() == 1 and queue.get(job.id).state == "queued"


def test_orphans_are_released_and_claims_never_overlap(tmp_path):
    path = tmp_path / "q.db"
    q = Queue(path)
    for v in range(1, 41):
        q.enqueue("m", str(v), "c")
    dead = q.claim("dead-worker", lease_s=3600)
    assert q.release_orphans("new-worker") == 1
    claimed: list[int] = []
    lock = threading.Lock()

    def work(name):
        local = Queue(path)
        while (job := local.claim(name, 60)) is not None:
            with lock:
                claimed.append(job.id)
            assert local.complete(job, f"run-{job.id}")
        local.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == list(range(1, 41))  # every job exactly once, the orphan included
    assert dead.id in claimed and q.counts() == {"done": 40}
    assert len(q.events(kind="done")) == 40


# -- signatures ----------------------------------------------------------------------------------
def test_signature_matches_mlflow_and_supports_rotation():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}})
    ts = str(int(time.time()))
    assert sign(SECRET, "d1", ts, body.encode()) == _generate_hmac_signature(SECRET, "d1", ts, body)
    both = f"{sign('old-secret', 'd1', ts, body.encode())} {sign(SECRET, 'd1', ts, body.encode())}"
    assert (
        verify(
            {"X-MLflow-Signature": both, "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": ts},
            body.encode(),
            SECRET,
        )
        == "d1"
    )


# -- the receiver over HTTP ----------------------------------------------------------------------
@pytest.fixture
def receiver(tmp_path):
    aliases: list[tuple[str, str, str]] = []
    rec = Receiver(tmp_path / "queue.db", SECRET, lambda: "cfg", on_alias=lambda *a: aliases.append(a))
    server = ListenerServer(("127.0.0.1", 0), rec)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, Queue(tmp_path / "queue.db"), aliases
    server.shutdown()
    server.server_close()


def post(server, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.request("POST", "/webhook", body=body, headers={"Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data or b"{}")


def delivery(
    data: dict,
    secret: str = SECRET,
    age: float = 0.0,
    entity: str = "model_version",
    action: str = "created",
    delivery_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """A delivery exactly as MLflow builds it (mlflow.webhooks.delivery._send_webhook_request)."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    payload = json.dumps(
        {"entity": entity, "action": action, "timestamp": "2026-01-01T00:00:00+00:00", "data": data}
    )
    did, ts = delivery_id or str(uuid.uuid4()), str(int(time.time() - age))
    return payload.encode(), {
        "X-MLflow-Delivery-Id": did,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": _generate_hmac_signature(secret, did, ts, payload),
    }


def test_signed_delivery_enqueues_once_and_replay_is_refused(receiver):
    server, queue, _ = receiver
    body, headers = delivery({"name": "shapes-cnn", "version": "7", "source": "x", "tags": {}})
    status, reply = post(server, body, headers)
    assert status == 202 and reply["created"]
    assert [(j.model, j.version, j.config, j.source) for j in queue.jobs()] == [
        ("shapes-cnn", "7", "cfg", "webhook")
    ]
    status, reply = post(server, body, headers)  # the same delivery again
    assert status == 409 and "replayed" in reply["error"]
    assert len(queue.jobs()) == 1 and len(queue.events(kind="enqueued")) == 1


def test_forged_unsigned_stale_and_malformed_deliveries_enqueue_nothing(receiver):
    server, queue, _ = receiver
    data = {"name": "shapes-cnn", "version": "8"}
    body, good = delivery(data)
    cases = {
        "unsigned": (body, {k: v for k, v in good.items() if k != "X-MLflow-Signature"}, 401),
        "no delivery id": (body, {k: v for k, v in good.items() if k != "X-MLflow-Delivery-Id"}, 401),
        "wrong secret": (*delivery(data, secret="not-the-secret"), 401),
        "tampered body": (body.replace(b'"8"', b'"9"'), good, 401),
        "signature of another delivery": (body, {**good, "X-MLflow-Delivery-Id": "other-id"}, 401),
        "stale": (*delivery(data, age=400), 401),
        "from the future": (*delivery(data, age=-400), 401),
        "garbage signature": (body, {**good, "X-MLflow-Signature": "v1,AAAA"}, 401),
        "path traversal name": (*delivery({"name": "../../etc/passwd", "version": "1"}), 422),
        "slash in name": (*delivery({"name": "a/b", "version": "1"}), 422),
        "traversal version": (*delivery({"name": "shapes-cnn", "version": "1/../../x"}), 422),
        "not json": (*_signed_raw(b"not json"), 400),
    }
    for label, (b, h, expected) in cases.items():
        status, reply = post(server, b, h)
        assert status == expected, (label, status, reply)
        assert "error" in reply
    assert queue.jobs() == []
    assert queue.conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 0


def _signed_raw(body: bytes) -> tuple[bytes, dict[str, str]]:
    did, ts = str(uuid.uuid4()), str(int(time.time()))
    return body, {
        "X-MLflow-Delivery-Id": did,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(SECRET, did, ts, body),
    }


def test_alias_and_other_events(receiver):
    server, queue, aliases = receiver
    status, _ = post(
        server,
        *delivery(
            {"name": "m", "alias": "champion", "version": "2"}, entity="model_version_alias", action="created"
        ),
    )
    assert status == 202 and aliases == [("m", "champion", "2")]
    status, reply = post(server, *delivery({"name": "m"}, entity="registered_model", action="created"))
    assert status == 200 and reply["ignored"] == "registered_model.created"
    assert queue.jobs() == []


def test_oversized_body_is_refused(receiver):
    server, queue, _ = receiver
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    conn.putrequest("POST", "/webhook")
    conn.putheader("Content-Length", str(50 << 20))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert queue.jobs() == []


# -- the worker when MLflow cannot be reached ----------------------------------------------------
def test_unreachable_mlflow_fails_the_job_with_backoff_and_loses_nothing(tmp_path, monkeypatch, caplog):
    from registry.server import free_port
    from registry.state import State
    from registry.worker import Worker, WorkerConfig

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    dead = f"http://127.0.0.1:{free_port()}"
    ws = tmp_path / "ws"
    ws.mkdir()
    q = Queue(State(ws).ensure().queue_db)
    for v in ("1", "2", "3"):
        q.enqueue("shapes-cnn", v, "cfg")
    worker = Worker(ws, WorkerConfig(lease=30, backoff=60), uri=dead)
    with caplog.at_level("ERROR", logger="xai.registry"):
        assert worker.run(once=True) == 3
    jobs = q.jobs()
    assert [j.state for j in jobs] == ["queued"] * 3  # each retried later, none lost or dropped
    for j in jobs:
        assert j.attempts == 1 and j.next_run_at > time.time() + 50
        assert "MLflow unreachable" in j.last_error and dead in j.last_error
    assert "MLflow unreachable" in caplog.text and "retry in" in caplog.text
    assert worker.run(once=True) == 0  # backing off: nothing is due
    q.close()


def test_a_second_worker_in_the_same_workspace_is_refused(tmp_path):
    from core.errors import XAIError
    from registry.worker import Worker

    first = Worker(tmp_path, uri="http://127.0.0.1:9")
    first.acquire()
    with pytest.raises(XAIError, match="another worker"):
        Worker(tmp_path, uri="http://127.0.0.1:9").acquire()


def test_state_dir_is_git_ignored(tmp_path):
    from registry.state import State

    State(tmp_path).ensure()
    assert (tmp_path / ".xai" / ".gitignore").read_text().strip() == "*"
    assert Path(tmp_path / ".xai" / "registry").is_dir()
