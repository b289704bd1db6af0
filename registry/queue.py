"""The durable job queue (sqlite in WAL mode) between the receivers and the worker.

One job per (model, version, pipeline config hash): enqueueing the same key again is a no-op, so a
webhook, a poll and a retry of the webhook all end in one job. States: queued -> running -> done, or
back to queued with exponential backoff after a failure, and failed once the attempts are used up.
A claim holds a lease that the worker renews; a job whose worker died (lease expired) is claimed
again. Every claim gets a fresh token, and only the holder of the current token can finish a job, so
a worker that lost its lease cannot mark the job done twice. Every transition is appended to an
``events`` table (the audit trail the tests read). Delivery ids of webhooks are kept here too, in the
same transaction as the job they enqueue.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import XAIError
from core.redact import redact_text

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs(
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  model TEXT NOT NULL, version TEXT NOT NULL, config TEXT NOT NULL,
  state TEXT NOT NULL DEFAULT 'queued',
  attempts INTEGER NOT NULL DEFAULT 0, max_attempts INTEGER NOT NULL DEFAULT 5,
  next_run_at REAL NOT NULL, lease_until REAL, token TEXT, worker TEXT,
  source TEXT, last_error TEXT, run_id TEXT, result TEXT,
  created_at REAL NOT NULL, updated_at REAL NOT NULL,
  UNIQUE(model, version, config));
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(state, next_run_at);
CREATE TABLE IF NOT EXISTS deliveries(id TEXT PRIMARY KEY, received_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events(
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER, at REAL NOT NULL, kind TEXT NOT NULL,
  worker TEXT, detail TEXT);
"""
DELIVERY_KEEP_S = 7 * 24 * 3600.0


class QueueError(XAIError):
    """The queue database cannot be used now: locked by another process, corrupt, or the disk is
    full. One line; the listener answers 503 with Retry-After, the worker waits and tries again."""


@contextmanager
def translated(path: Path) -> Iterator[None]:
    """sqlite errors of the queue database as one-line ``QueueError``s saying what is wrong."""
    try:
        yield
    except sqlite3.Error as exc:
        text = str(exc)
        lowered = text.lower()
        if "locked" in lowered or "busy" in lowered:
            why = "is locked by another process (try again when it is done)"
        elif "full" in lowered:
            why = "cannot grow: the disk is full"
        elif "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            why = "is corrupt (move it aside; `xai sync` enqueues the registry's versions again)"
        else:
            why = f"failed: {text}"
        raise QueueError(f"queue database {str(path)!r} {why} ({type(exc).__name__}: {text})") from None


@dataclass
class Job:
    id: int
    model: str
    version: str
    config: str
    state: str
    attempts: int
    max_attempts: int
    next_run_at: float
    lease_until: float | None
    token: str | None
    worker: str | None
    source: str | None
    last_error: str | None
    run_id: str | None
    result: str | None
    created_at: float
    updated_at: float

    @property
    def key(self) -> str:
        return f"{self.model}/{self.version}@{self.config}"


def backoff_delay(attempts: int, base: float, cap: float) -> float:
    """Exponential backoff with up to 25% jitter: base, 2 base, 4 base ... capped."""
    return min(cap, base * 2 ** max(0, attempts - 1)) * (1.0 + 0.25 * random.random())


class Queue:
    """A handle on the queue database; cheap to create, one per thread."""

    def __init__(self, path: str | Path, busy_timeout: float = 60.0, shared: bool = False):
        """``busy_timeout``: seconds to wait for a lock held by another process; ``shared``: the
        handle may be used from several threads (the caller serializes the calls)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with translated(self.path):
            self.conn = sqlite3.connect(
                str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=not shared
            )
            try:
                self.conn.row_factory = sqlite3.Row
                self.conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                tables = {
                    r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
                }
                if not {"jobs", "deliveries", "events"} <= tables:  # readers never wait for a writer's lock
                    with self.tx() as c:
                        for statement in SCHEMA.split(";"):
                            if statement.strip():
                                c.execute(statement)
            except BaseException:
                self.conn.close()
                raise

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so claims never race. sqlite
        errors (locked, disk full, corrupt) leave as ``QueueError``, the transaction rolled back."""
        with translated(self.path):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                with suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
                raise

    def _event(
        self,
        c: sqlite3.Connection,
        job_id: int | None,
        kind: str,
        worker: str | None = None,
        detail: str | None = None,
    ) -> None:
        c.execute(
            "INSERT INTO events(job_id, at, kind, worker, detail) VALUES (?,?,?,?,?)",
            (job_id, time.time(), kind, worker, detail),
        )

    def _get(self, c: sqlite3.Connection, job_id: int) -> Job:
        return Job(**dict(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()))

    # -- producers ---------------------------------------------------------------------------
    def _enqueue(
        self, c: sqlite3.Connection, model: str, version: str, config: str, source: str, max_attempts: int
    ) -> tuple[Job, bool]:
        now = time.time()
        cur = c.execute(
            "INSERT OR IGNORE INTO jobs(model, version, config, state, max_attempts, next_run_at, "
            "source, created_at, updated_at) VALUES (?,?,?,'queued',?,?,?,?,?)",
            (model, version, config, max_attempts, now, source, now, now),
        )
        created = cur.rowcount == 1
        row = c.execute(
            "SELECT id FROM jobs WHERE model=? AND version=? AND config=?", (model, version, config)
        ).fetchone()
        if created:
            self._event(c, row["id"], "enqueued", detail=source)
        return self._get(c, row["id"]), created

    def enqueue(
        self, model: str, version: str, config: str, source: str = "cli", max_attempts: int = 5
    ) -> tuple[Job, bool]:
        """Add a job unless one exists for this key. Returns (job, created)."""
        with self.tx() as c:
            return self._enqueue(c, model, version, config, source, max_attempts)

    def accept_delivery(
        self, delivery_id: str, jobs: list[tuple[str, str, str]], max_attempts: int = 5
    ) -> tuple[bool, list[tuple[Job, bool]]]:
        """Record a webhook delivery id and enqueue its jobs atomically. A delivery id seen before is
        a replay: nothing is enqueued and (False, []) is returned."""
        now = time.time()
        with self.tx() as c:
            if c.execute("SELECT 1 FROM deliveries WHERE id=?", (delivery_id,)).fetchone():
                return False, []
            c.execute("INSERT INTO deliveries(id, received_at) VALUES (?,?)", (delivery_id, now))
            c.execute("DELETE FROM deliveries WHERE received_at < ?", (now - DELIVERY_KEEP_S,))
            return True, [self._enqueue(c, m, v, cfg, "webhook", max_attempts) for m, v, cfg in jobs]

    def retry_failed(self, model: str | None = None) -> int:
        """Put permanently failed jobs back in the queue with fresh attempts."""
        with self.tx() as c:
            rows = c.execute(
                "SELECT id FROM jobs WHERE state='failed' AND (? IS NULL OR model=?)", (model, model)
            ).fetchall()
            for row in rows:
                c.execute(
                    "UPDATE jobs SET state='queued', attempts=0, next_run_at=?, updated_at=? WHERE id=?",
                    (time.time(), time.time(), row["id"]),
                )
                self._event(c, row["id"], "requeued")
            return len(rows)

    # -- the worker side ---------------------------------------------------------------------
    def claim(self, worker: str, lease_s: float) -> Job | None:
        """Take the next ready job (queued and due, or running with an expired lease)."""
        now = time.time()
        with self.tx() as c:
            row = c.execute(
                "SELECT id, state FROM jobs WHERE (state='queued' AND next_run_at<=?) "
                "OR (state='running' AND lease_until<?) ORDER BY next_run_at, id LIMIT 1",
                (now, now),
            ).fetchone()
            if row is None:
                return None
            if row["state"] == "running":
                self._event(c, row["id"], "lease_expired", worker)
            token = uuid.uuid4().hex
            c.execute(
                "UPDATE jobs SET state='running', attempts=attempts+1, lease_until=?, token=?, worker=?, "
                "updated_at=? WHERE id=?",
                (now + lease_s, token, worker, now, row["id"]),
            )
            self._event(c, row["id"], "claimed", worker)
            return self._get(c, row["id"])

    def _owned(self, c: sqlite3.Connection, job: Job) -> bool:
        row = c.execute("SELECT token, state FROM jobs WHERE id=?", (job.id,)).fetchone()
        return row is not None and row["state"] == "running" and row["token"] == job.token

    def heartbeat(self, job: Job, lease_s: float) -> bool:
        """Extend the lease; False when the job is no longer ours (lease lost)."""
        with self.tx() as c:
            if not self._owned(c, job):
                return False
            c.execute(
                "UPDATE jobs SET lease_until=?, updated_at=? WHERE id=?",
                (time.time() + lease_s, time.time(), job.id),
            )
            return True

    def complete(self, job: Job, run_id: str | None, result: dict[str, Any] | None = None) -> bool:
        with self.tx() as c:
            if not self._owned(c, job):
                self._event(c, job.id, "stale_complete", job.worker)
                return False
            c.execute(
                "UPDATE jobs SET state='done', run_id=?, result=?, lease_until=NULL, last_error=NULL, "
                "updated_at=? WHERE id=?",
                (run_id, json.dumps(result or {}), time.time(), job.id),
            )
            self._event(c, job.id, "done", job.worker, run_id)
            return True

    def fail(
        self, job: Job, error: str, retryable: bool = True, backoff: float = 5.0, backoff_cap: float = 600.0
    ) -> Job | None:
        """Record a failed attempt: back to queued after a backoff while attempts remain, else failed.
        Returns the updated job, or None when the job was no longer ours."""
        now, error = time.time(), redact_text(error)
        with self.tx() as c:
            if not self._owned(c, job):
                return None
            current = self._get(c, job.id)
            if retryable and current.attempts < current.max_attempts:
                delay = backoff_delay(current.attempts, backoff, backoff_cap)
                c.execute(
                    "UPDATE jobs SET state='queued', next_run_at=?, lease_until=NULL, last_error=?, "
                    "updated_at=? WHERE id=?",
                    (now + delay, error, now, job.id),
                )
                self._event(c, job.id, "retry", job.worker, f"in {delay:.1f}s: {error}")
            else:
                c.execute(
                    "UPDATE jobs SET state='failed', lease_until=NULL, last_error=?, updated_at=? WHERE id=?",
                    (error, now, job.id),
                )
                self._event(c, job.id, "failed", job.worker, error)
            return self._get(c, job.id)

    def release_orphans(self, worker: str) -> int:
        """Expire the leases of running jobs (their worker is known to be gone)."""
        with self.tx() as c:
            rows = c.execute("SELECT id FROM jobs WHERE state='running'").fetchall()
            for row in rows:
                c.execute("UPDATE jobs SET lease_until=0 WHERE id=?", (row["id"],))
                self._event(c, row["id"], "orphan_released", worker)
            return len(rows)

    # -- reading -----------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        return self._get(self.conn, job_id)

    def find(self, model: str, version: str, config: str | None = None) -> list[Job]:
        rows = self.conn.execute(
            "SELECT * FROM jobs WHERE model=? AND version=? AND (? IS NULL OR config=?) ORDER BY id",
            (model, version, config, config),
        ).fetchall()
        return [Job(**dict(r)) for r in rows]

    def jobs(self, state: str | None = None) -> list[Job]:
        with translated(self.path):
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE (? IS NULL OR state=?) ORDER BY id", (state, state)
            ).fetchall()
        return [Job(**dict(r)) for r in rows]

    def counts(self) -> dict[str, int]:
        with translated(self.path):
            rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: r["n"] for r in rows}

    def events(self, job_id: int | None = None, kind: str | None = None) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM events WHERE (? IS NULL OR job_id=?) AND (? IS NULL OR kind=?) ORDER BY id",
            (job_id, job_id, kind, kind),
        ).fetchall()
        return [dict(r) for r in rows]

    def next_due(self) -> float | None:
        row = self.conn.execute("SELECT MIN(next_run_at) AS t FROM jobs WHERE state='queued'").fetchone()
        return row["t"] if row else None
