"""``xai listen``: the webhook receiver, plus a background poller and the alias guard.

The HTTP server only verifies and enqueues (:mod:`registry.webhooks`). A background thread runs
``xai sync`` every ``poll_interval`` seconds (and once at start), so versions registered while the
receiver was down, or whose delivery failed, are still picked up; with the guard on it also checks
guarded aliases. Alias events are handled on that thread too, never in the request.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.state import State, config_hash
from registry.webhooks import ListenerServer, Receiver, register_webhook

log = logging.getLogger("xai.registry")


@dataclass
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 0
    public_url: str | None = None
    register: bool = False
    poll_interval: float = 60.0
    guarded: tuple[str, ...] = ("champion",)
    max_attempts: int = 5


class Listener:
    def __init__(self, workspace: str | Path | None, secret: str, uri_fn: Any, config: ListenConfig):
        self.state = State(workspace).ensure()
        self.config, self.uri_fn = config, uri_fn
        self._alias_events: queue_mod.Queue = queue_mod.Queue()
        self._stop = threading.Event()
        receiver = Receiver(
            self.state.queue_db,
            secret,
            lambda: config_hash(self.state.workspace),
            on_alias=lambda *event: self._alias_events.put(event),
            max_attempts=config.max_attempts,
        )
        self.server = ListenerServer((config.host, config.port), receiver)
        self.secret = secret

    @property
    def url(self) -> str:
        return self.config.public_url or self.server.url

    def _client(self) -> Any:
        from registry.models import client_for

        return client_for(self.uri_fn())

    def register(self) -> None:
        hook = register_webhook(self._client(), self.url, self.secret)
        log.info("MLflow webhook %s (%s) -> %s", hook.name, hook.webhook_id, self.url)

    def _background(self) -> None:
        from registry.gate import check_aliases, guard_alias
        from registry.poller import sync

        next_poll = time.monotonic()
        while not self._stop.is_set():
            timeout = max(0.0, next_poll - time.monotonic()) if self.config.poll_interval > 0 else 1.0
            try:
                name, alias, version = self._alias_events.get(timeout=min(timeout, 1.0))
                if self.config.guarded:
                    guard_alias(self._client(), name, alias, version, self.config.guarded)
                continue
            except queue_mod.Empty:
                pass
            except Exception as exc:
                log.error("alias guard failed: %s", exc)
                continue
            if self.config.poll_interval > 0 and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.config.poll_interval
                try:
                    client = self._client()
                    result = sync(client, self.state.workspace, max_attempts=self.config.max_attempts)
                    if result.enqueued:
                        log.info(
                            "poller: enqueued %d version(s) the webhooks had not delivered",
                            len(result.enqueued),
                        )
                    if self.config.guarded:
                        check_aliases(client, self.config.guarded)
                except Exception as exc:
                    log.warning("poller: %s", str(exc).splitlines()[0][:300])

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT; records the URL and PID in the workspace meanwhile."""
        self.state.write_json(
            self.state.listener_file, {"pid": os.getpid(), "url": self.url, "started_at": time.time()}
        )
        if self.config.register:
            self.register()
        background = threading.Thread(target=self._background, name="poller", daemon=True)
        background.start()

        def stop(*_: Any) -> None:
            self._stop.set()
            threading.Thread(target=self.server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
        try:
            self.server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop.set()
            self.server.server_close()
