"""The webhook receiver behind ``xai listen``.

MLflow signs each delivery (``mlflow/webhooks/delivery.py``): ``X-MLflow-Signature: v1,<base64
HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")>`` with ``X-MLflow-Delivery-Id`` and
``X-MLflow-Timestamp`` (Unix seconds). MLflow does not stop replays, so the receiver does:

- no or a wrong signature -> 401 (constant-time comparison; several ``v1,`` values may be given,
  space-separated, for secret rotation);
- a timestamp more than 5 minutes away from now -> 401 (stale);
- a delivery id seen before -> 409 (ids are persisted with the jobs, in one transaction);
- a model name or version that is not accepted (:mod:`registry.names`) -> 422;
- ``model_version.created`` -> the job is enqueued, 202; ``model_version_alias.created`` -> the alias
  guard is scheduled, 202; other events -> 200, ignored.

Nothing slow happens before the answer: enqueueing is one sqlite transaction. A queue that cannot
take the delivery (locked, disk full, corrupt) -> 503 with ``Retry-After`` (MLflow retries 5xx); a
malformed timestamp -> 400.

The server (:class:`ListenerServer`) is hardened against cheap starvation: a listen backlog of
1024, a read time-out on every connection and a deadline for each request (a slow client is
closed when it passes it), and a bound on concurrent connections (kept under the process's file
limit); a connection over the bound gets an immediate 503 with ``Retry-After``. Errors are one log
line, never a traceback or a dropped connection.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from registry.names import InvalidNameError, check_alias, check_name, check_version
from registry.queue import Queue, QueueError

log = logging.getLogger("xai.registry")

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
MAX_AGE_S = 300.0
MAX_BODY = 1 << 20
WEBHOOK_NAME = "xai-listener"
EVENTS = ("model_version.created", "model_version_alias.created")
RETRY_AFTER_S = 5
READ_TIMEOUT_S = 5.0  # one read on a connection (headers, body, the next keep-alive request)
REQUEST_TIMEOUT_S = 15.0  # a whole request, however slowly its bytes arrive
MAX_CONNECTIONS = 512
QUEUE_BUSY_S = 5.0  # how long a delivery waits for a queue locked by another process


class Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1,<base64>`` signature MLflow sends (used by tests and by senders other than MLflow)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(
    headers: Mapping[str, str], body: bytes, secret: str, now: float | None = None, max_age: float = MAX_AGE_S
) -> str:
    """Check signature and age of a delivery; returns its delivery id or raises ``Rejected(401)``."""
    signature, delivery_id, timestamp = (
        headers.get(h) for h in (SIGNATURE_HEADER, DELIVERY_HEADER, TIMESTAMP_HEADER)
    )
    if not signature or not delivery_id or not timestamp:
        raise Rejected(
            401, "unsigned delivery (X-MLflow-Signature, -Delivery-Id and -Timestamp are required)"
        )
    if len(delivery_id) > 200 or not delivery_id.isprintable():
        raise Rejected(401, "malformed delivery id")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise Rejected(400, "malformed timestamp (Unix seconds expected)")
    sent = int(timestamp)
    now = time.time() if now is None else now
    if abs(now - sent) > max_age:
        when = f"sent {now - sent:.0f}s ago" if sent < now else f"dated {sent - now:.0f}s in the future"
        raise Rejected(401, f"stale delivery: {when} (limit {max_age:.0f}s)")
    expected = sign(secret, delivery_id, timestamp, body).encode()
    offered = [s.encode() for s in signature.split() if s.startswith("v1,")]
    # compare against every offered value (no early exit that depends on secret data)
    matches = [hmac.compare_digest(expected, candidate) for candidate in offered]
    if not any(matches):
        raise Rejected(401, "invalid signature")
    return delivery_id


class Receiver:
    """What the HTTP handler calls: verify, validate, enqueue. Framework-free, one queue per thread."""

    def __init__(
        self,
        queue_path: Path,
        secret: str,
        config_hash: Callable[[], str],
        on_alias: Callable[[str, str, str], None] | None = None,
        max_age: float = MAX_AGE_S,
        max_attempts: int = 5,
        busy_timeout: float = QUEUE_BUSY_S,
    ):
        if not secret:
            raise ValueError("a webhook secret is required: unsigned deliveries are always refused")
        self.queue_path, self.secret, self.config_hash = queue_path, secret, config_hash
        self.on_alias, self.max_age, self.max_attempts = on_alias, max_age, max_attempts
        self.busy_timeout = busy_timeout
        self._queue: Queue | None = None
        self._lock = threading.Lock()  # sqlite serializes writers anyway: one handle, one at a time

    @contextmanager
    def locked_queue(self) -> Iterator[Queue]:
        """The receiver's one queue handle, opened on first use (again after an error)."""
        if not self._lock.acquire(timeout=self.busy_timeout * 2):
            raise QueueError(f"queue database {str(self.queue_path)!r} is busy: too many deliveries at once")
        try:
            if self._queue is None:
                self._queue = Queue(self.queue_path, busy_timeout=self.busy_timeout, shared=True)
            yield self._queue
        except QueueError:
            if self._queue is not None:
                self._queue.close()
            self._queue = None
            raise
        finally:
            self._lock.release()

    def health(self) -> tuple[int, dict[str, Any]]:
        try:
            with self.locked_queue() as queue:
                return 200, {"ok": True, "queue": queue.counts()}
        except QueueError as exc:
            log.error("health: %s", exc)
            return 503, {"ok": False, "error": str(exc)}

    def _accept(self, delivery_id: str, jobs: list[tuple[str, str, str]]) -> tuple[bool, list]:
        with self.locked_queue() as queue:
            return queue.accept_delivery(delivery_id, jobs, self.max_attempts)

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            return self._handle(headers, body)
        except Rejected as exc:
            log.warning("webhook refused (%d): %s", exc.status, exc.reason)
            return exc.status, {"error": exc.reason}
        except InvalidNameError as exc:
            log.warning("webhook refused (422): %s", exc)
            return 422, {"error": str(exc)}
        except QueueError as exc:  # locked, full or corrupt: MLflow retries a 5xx later
            log.error("webhook not enqueued (503): %s", exc)
            return 503, {"error": str(exc), "retry_after": RETRY_AFTER_S}

    def _handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        delivery_id = verify(headers, body, self.secret, max_age=self.max_age)
        event = _parse(body)
        kind = f"{event.get('entity')}.{event.get('action')}"
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if kind == "model_version.created":
            name, version = check_name(data.get("name")), check_version(data.get("version"))
            fresh, jobs = self._accept(delivery_id, [(name, version, self.config_hash())])
            _replayed(fresh, delivery_id)
            job, created = jobs[0]
            log.info("webhook %s: %s %s %s (job %d)", delivery_id, kind, name, version, job.id)
            return 202, {"job": job.id, "created": created}
        if kind == "model_version_alias.created":
            name, version = check_name(data.get("name")), check_version(data.get("version"))
            alias = check_alias(data.get("alias"))
            fresh, _ = self._accept(delivery_id, [])
            _replayed(fresh, delivery_id)
            if self.on_alias is not None:
                self.on_alias(name, alias, version)
            return 202, {"alias": alias, "version": version}
        fresh, _ = self._accept(delivery_id, [])
        _replayed(fresh, delivery_id)
        return 200, {"ignored": kind}


def _parse(body: bytes) -> dict[str, Any]:
    try:
        event = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise Rejected(400, "body is not JSON") from None
    if not isinstance(event, dict):
        raise Rejected(400, "body is not a JSON object")
    return event


def _replayed(fresh: bool, delivery_id: str) -> None:
    if not fresh:
        raise Rejected(409, f"replayed delivery {delivery_id}")


class _Handler(BaseHTTPRequestHandler):
    server: ListenerServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # StreamRequestHandler applies it to the socket
        super().setup()

    def handle_one_request(self) -> None:
        self.server.track(self.connection)  # the deadline of the request about to be read
        super().handle_one_request()

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 500:
            self.send_header("Retry-After", str(RETRY_AFTER_S))
        self.end_headers()
        self.wfile.write(data)

    def _guarded(self, answer: Callable[[], tuple[int, dict[str, Any]]]) -> None:
        try:
            status, payload = answer()
        except (TimeoutError, ConnectionError):
            self.close_connection = True
            return
        except Exception as exc:  # never a traceback nor a dropped connection: a 5xx MLflow retries
            log.error(
                "webhook receiver error (500): %s: %s",
                type(exc).__name__,
                str(exc).splitlines()[0][:300] if str(exc) else "",
            )
            status, payload = 500, {"error": f"internal error ({type(exc).__name__}); retry later"}
        self._reply(status, payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] == "/health":
            self._guarded(self.server.receiver.health)
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.split("?")[0] not in ("/webhook", "/"):
            self._reply(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            self._reply(413, {"error": f"body must be 0-{MAX_BODY} bytes"})
            return
        try:
            body = self.rfile.read(length)
        except (TimeoutError, ConnectionError, OSError):
            self.close_connection = True
            return
        if len(body) < length:  # the client gave up, or passed the request's deadline
            self.close_connection = True
            return
        self._guarded(lambda: self.server.receiver.handle(self.headers, body))

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)


def connection_limit(wanted: int = MAX_CONNECTIONS, reserve: int = 64) -> int:
    """Concurrent connections to serve: ``wanted``, kept ``reserve`` descriptors under the soft
    file limit (sqlite, MLflow and logging need theirs), at least 4."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(4, min(wanted, soft - reserve))


class ListenerServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with a real backlog, read time-outs, request deadlines and a bound on
    concurrent connections (one thread each); see the module docstring."""

    daemon_threads = True
    request_queue_size = 1024

    def __init__(
        self,
        address: tuple[str, int],
        receiver: Receiver,
        read_timeout: float = READ_TIMEOUT_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int | None = None,
    ):
        self.read_timeout, self.request_timeout = read_timeout, request_timeout
        self.max_connections = max_connections or connection_limit()
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._deadlines: dict[socket.socket, float] = {}
        self._deadlines_lock = threading.Lock()
        self._closed = threading.Event()
        super().__init__(address, _Handler)
        self.receiver = receiver
        threading.Thread(target=self._reap, name="listener-reaper", daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/webhook"

    @property
    def reading(self) -> int:
        """Connections accepted and reading a request now (each with its deadline running)."""
        with self._deadlines_lock:
            return len(self._deadlines)

    def track(self, conn: socket.socket) -> None:
        """Start the deadline of the next request on ``conn``."""
        with self._deadlines_lock:
            self._deadlines[conn] = time.monotonic() + self.request_timeout

    def _reap(self) -> None:
        """Close connections whose request passed its deadline (slow-loris senders)."""
        while not self._closed.wait(min(0.25, self.request_timeout / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [c for c, t in self._deadlines.items() if t < now]
                for conn in late:
                    del self._deadlines[conn]
            for conn in late:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._deadlines_lock:
                self._deadlines.pop(request, None)
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Over the bound: an immediate 503 + Retry-After, then close (no thread spent on it)."""
        body = json.dumps(
            {"error": "too many connections; retry later", "retry_after": RETRY_AFTER_S}
        ).encode()
        head = (
            f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n"
        )
        try:
            request.settimeout(0.2)
            request.sendall(head.encode() + body)
            request.shutdown(socket.SHUT_WR)
            request.recv(1 << 16)  # drain what was sent, so closing does not reset the reply
        except OSError:
            pass
        finally:
            self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        log.error(
            "listener: connection from %s failed: %s: %s",
            client_address[0] if client_address else "?",
            type(exc).__name__,
            exc,
        )

    def server_close(self) -> None:
        self._closed.set()
        super().server_close()


def register_webhook(client: Any, url: str, secret: str, name: str = WEBHOOK_NAME) -> Any:
    """Create the MLflow webhook (or update the one with this name) for our events and secret."""
    existing = None
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        existing = next((w for w in page if w.name == name), existing)
        token = page.token
        if not token or existing is not None:
            break
    if existing is not None:
        return client.update_webhook(
            existing.webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE"
        )
    return client.create_webhook(
        name=name,
        url=url,
        events=list(EVENTS),
        secret=secret,
        description="xai: explain, check and gate every model version",
    )
