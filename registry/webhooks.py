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

Nothing slow happens before the answer: enqueueing is one sqlite transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from registry.names import InvalidNameError, check_alias, check_name, check_version
from registry.queue import Queue

log = logging.getLogger("xai.registry")

SIGNATURE_HEADER = "X-MLflow-Signature"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
MAX_AGE_S = 300.0
MAX_BODY = 1 << 20
WEBHOOK_NAME = "xai-listener"
EVENTS = ("model_version.created", "model_version_alias.created")


class Rejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``v1,<base64>`` signature MLflow sends (used by tests and by senders other than MLflow)."""
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float | None = None,
           max_age: float = MAX_AGE_S) -> str:
    """Check signature and age of a delivery; returns its delivery id or raises ``Rejected(401)``."""
    signature, delivery_id, timestamp = (headers.get(h) for h in (SIGNATURE_HEADER, DELIVERY_HEADER, TIMESTAMP_HEADER))
    if not signature or not delivery_id or not timestamp:
        raise Rejected(401, "unsigned delivery (X-MLflow-Signature, -Delivery-Id and -Timestamp are required)")
    if len(delivery_id) > 200 or not delivery_id.isprintable():
        raise Rejected(401, "malformed delivery id")
    try:
        sent = int(timestamp)
    except ValueError:
        raise Rejected(401, "malformed timestamp") from None
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

    def __init__(self, queue_path: Path, secret: str, config_hash: Callable[[], str],
                 on_alias: Callable[[str, str, str], None] | None = None, max_age: float = MAX_AGE_S,
                 max_attempts: int = 5):
        if not secret:
            raise ValueError("a webhook secret is required: unsigned deliveries are always refused")
        self.queue_path, self.secret, self.config_hash = queue_path, secret, config_hash
        self.on_alias, self.max_age, self.max_attempts = on_alias, max_age, max_attempts
        self._local = threading.local()

    @property
    def queue(self) -> Queue:
        if getattr(self._local, "queue", None) is None:
            self._local.queue = Queue(self.queue_path)
        return self._local.queue

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            delivery_id = verify(headers, body, self.secret, max_age=self.max_age)
            event = _parse(body)
            kind = f"{event.get('entity')}.{event.get('action')}"
            data = event.get("data") if isinstance(event.get("data"), dict) else {}
            if kind == "model_version.created":
                name, version = check_name(data.get("name")), check_version(data.get("version"))
                fresh, jobs = self.queue.accept_delivery(delivery_id, [(name, version, self.config_hash())],
                                                         self.max_attempts)
                _replayed(fresh, delivery_id)
                job, created = jobs[0]
                log.info("webhook %s: %s %s %s (job %d)", delivery_id, kind, name, version, job.id)
                return 202, {"job": job.id, "created": created}
            if kind == "model_version_alias.created":
                name, version = check_name(data.get("name")), check_version(data.get("version"))
                alias = check_alias(data.get("alias"))
                fresh, _ = self.queue.accept_delivery(delivery_id, [])
                _replayed(fresh, delivery_id)
                if self.on_alias is not None:
                    self.on_alias(name, alias, version)
                return 202, {"alias": alias, "version": version}
            fresh, _ = self.queue.accept_delivery(delivery_id, [])
            _replayed(fresh, delivery_id)
            return 200, {"ignored": kind}
        except Rejected as exc:
            log.warning("webhook refused (%d): %s", exc.status, exc.reason)
            return exc.status, {"error": exc.reason}
        except InvalidNameError as exc:
            log.warning("webhook refused (422): %s", exc)
            return 422, {"error": str(exc)}


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

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?")[0] == "/health":
            self._reply(200, {"ok": True, "queue": self.server.receiver.queue.counts()})
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
        body = self.rfile.read(length)
        status, payload = self.server.receiver.handle(self.headers, body)
        self._reply(status, payload)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)


class ListenerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], receiver: Receiver):
        super().__init__(address, _Handler)
        self.receiver = receiver

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/webhook"


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
        return client.update_webhook(existing.webhook_id, url=url, events=list(EVENTS), secret=secret,
                                     status="ACTIVE")
    return client.create_webhook(name=name, url=url, events=list(EVENTS), secret=secret,
                                 description="xai: explain, check and gate every model version")
