"""Load on the webhook receiver, on 127.0.0.1 only, bounded in count and time (issue 16): concurrent
valid deliveries are all accepted; slow connections neither starve deliveries nor stay open past the
time-out; connections over the bound get a 503 with Retry-After, never a reset."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from registry.queue import Queue
from registry.webhooks import ListenerServer, Receiver, sign

SECRET = "load-secret"


def _delivery(version: int) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {
            "entity": "model_version",
            "action": "created",
            "data": {"name": "shapes-cnn", "version": str(version)},
        }
    ).encode()
    did, ts = str(uuid.uuid4()), str(int(time.time()))
    return body, {
        "X-MLflow-Delivery-Id": did,
        "X-MLflow-Timestamp": ts,
        "X-MLflow-Signature": sign(SECRET, did, ts, body),
        "Content-Type": "application/json",
    }


def _post(address, version: int) -> tuple[int, float, dict[str, str]]:
    started = time.monotonic()
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        body, headers = _delivery(version)
        conn.request("POST", "/webhook", body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.monotonic() - started, dict(resp.getheaders())
    except OSError as exc:  # a reset or refused connection: what the receiver must never do
        return -1, time.monotonic() - started, {"error": repr(exc)}
    finally:
        conn.close()


def _serve(tmp_path, **kwargs):
    rec = Receiver(tmp_path / "queue.db", SECRET, lambda: "cfg")
    server = ListenerServer(("127.0.0.1", 0), rec, **kwargs)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture
def served(tmp_path, request):
    server = _serve(tmp_path, **getattr(request, "param", {}))
    yield server, tmp_path / "queue.db"
    server.shutdown()
    server.server_close()


def _slow(address, n: int) -> list[socket.socket]:
    """``n`` connections that send half a request line and then nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=5)
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    return socks


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_200_concurrent_valid_deliveries_are_all_accepted(served):
    server, db = served
    barrier = threading.Barrier(200)

    def one(i: int):
        barrier.wait(timeout=30)
        return _post(server.server_address[:2], i + 1)

    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(one, range(200)))
    statuses = [a[0] for a in answers]
    print(
        f"200 concurrent deliveries: {statuses.count(202)} accepted, slowest {max(a[1] for a in answers):.2f}s"
    )
    assert statuses.count(202) == 200, sorted(set(statuses))
    assert len(Queue(db).jobs()) == 200


@pytest.mark.parametrize("served", [{"read_timeout": 3.0, "request_timeout": 4.0}], indirect=True)
def test_300_slow_connections_do_not_starve_deliveries_and_are_closed(served):
    server, db = served
    address = server.server_address[:2]
    socks = _slow(address, 300)
    try:
        # the deliveries start once all 300 are accepted and reading: what is timed is a delivery
        # beside them, not the accept loop working off a backlog of 300 (1.2 s on a busy CI machine)
        deadline = time.monotonic() + 30
        while server.reading < 300:
            assert time.monotonic() < deadline, f"{server.reading}/300 slow connections accepted"
            time.sleep(0.01)
        answers = [_post(address, i + 1) for i in range(10)]
        print(
            f"with 300 slow connections: {sum(a[0] == 202 for a in answers)}/10 deliveries accepted, "
            f"slowest {max(a[1] for a in answers):.3f}s"
        )
        assert all(a[0] == 202 for a in answers), answers
        assert max(a[1] for a in answers) < 1.0
        started = time.monotonic()
        closed = sum(_closed_within(s, max(0.05, 6.0 - (time.monotonic() - started))) for s in socks)
        print(f"slow connections closed by the server: {closed}/300 within {time.monotonic() - started:.2f}s")
        assert closed == 300
    finally:
        for s in socks:
            s.close()
    assert len(Queue(db).jobs()) == 10


@pytest.mark.parametrize("served", [{"read_timeout": 1.0, "request_timeout": 1.5}], indirect=True)
def test_a_dribbling_sender_is_closed_at_the_request_deadline(served):
    server, _ = served
    s = socket.create_connection(server.server_address[:2], timeout=5)
    started = time.monotonic()
    try:
        s.sendall(b"POST /webhook HTTP/1.1\r\n")
        s.settimeout(0.4)
        closed = False
        while time.monotonic() - started < 5.0 and not closed:
            try:
                s.sendall(b"X-Pad: 1\r\n")  # one header every 0.4 s: under the read time-out
                closed = s.recv(1) == b""
            except TimeoutError:
                continue
            except OSError:
                closed = True
        assert closed and time.monotonic() - started < 3.5
    finally:
        s.close()


@pytest.mark.parametrize(
    "served", [{"max_connections": 20, "read_timeout": 2.0, "request_timeout": 3.0}], indirect=True
)
def test_over_the_connection_bound_is_503_with_retry_after(served):
    server, _ = served
    address = server.server_address[:2]
    socks = _slow(address, 20)
    time.sleep(0.2)
    try:
        status, _, headers = _post(address, 1)
        assert status == 503 and int(headers["Retry-After"]) > 0, (status, headers)
    finally:
        for s in socks:
            s.close()
    time.sleep(0.3)
    assert _post(address, 2)[0] == 202  # slots come back as connections end
