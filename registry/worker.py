"""``xai worker``: takes jobs from the queue and runs each version's pipeline.

Per job: check the version exists, tag it ``xai.status=running``, find or start its MLflow run
(:mod:`registry.runlog`), run ``pipelines.api.run_version`` (the DVC stages), log maps, metrics,
results, report and verdict to the run, then tag the version ``xai.status=done``, ``xai.gate`` and
``xai.run_id``, and mark the job done. A failure (unknown version, a model that does not load, a
stage error, MLflow unreachable) is logged, written to the version's ``xai.error`` tag with
``xai.status=failed`` when MLflow can be reached, and retried with exponential backoff until the
job's attempts are used up; other jobs are not affected.

One worker per workspace (an OS lock; DVC allows one ``dvc repro`` per workspace anyway). At start it
releases the leases of jobs left running by a worker that died; while a job runs, a heartbeat thread
renews its lease, so a worker that dies elsewhere is detected when the lease runs out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import XAIError
from core.redact import redact_text
from registry import runlog
from registry.names import InvalidNameError, check_name, check_version
from registry.queue import Job, Queue, QueueError
from registry.state import State, experiment_name, tracking_uri

log = logging.getLogger("xai.registry")

# Fail fast when MLflow is down: the queue's backoff does the retrying, not the HTTP client.
CLIENT_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


class JobError(Exception):
    """A failed attempt: ``reason`` is what the tag and the log say; ``retryable`` whether to retry."""

    def __init__(self, reason: str, retryable: bool = True):
        super().__init__(reason)
        self.reason, self.retryable = reason, retryable


@dataclass
class WorkerConfig:
    lease: float = 120.0
    poll: float = 1.0
    backoff: float = 10.0
    backoff_cap: float = 900.0
    job_timeout: float | None = 3600.0


def describe(exc: BaseException, uri: str) -> JobError:
    """Turn any exception of an attempt into a clear, one-line reason, secrets masked (the reason
    goes to the log, the queue's ``last_error`` and the version's ``xai.error`` tag)."""
    error = _describe(exc, uri)
    return JobError(redact_text(error.reason), error.retryable)


def _describe(exc: BaseException, uri: str) -> JobError:
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, InvalidNameError):
        return JobError(str(exc), retryable=False)
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, XAIError) else str(exc)
    lowered = text.lower()
    if any(
        s in lowered
        for s in (
            "connection refused",
            "max retries exceeded",
            "failed to establish",
            "connectionerror",
            "name or service not known",
            "read timed out",
        )
    ):
        return JobError(f"MLflow unreachable at {uri}: {text.splitlines()[0][:300]}")
    stage = getattr(exc, "stage", None)
    if stage is not None:
        return JobError(f"pipeline stage {stage} failed: {getattr(exc, 'message', text)}"[:2000])
    return JobError(text.splitlines()[0][:2000] if text else type(exc).__name__)


class Heartbeat:
    """Renews a job's lease every lease/3 seconds from a thread of its own."""

    def __init__(self, queue_path: Path, job: Job, lease: float):
        self.queue_path, self.job, self.lease = queue_path, job, lease
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        queue: Queue | None = None
        try:
            while not self._stop.wait(self.lease / 3):
                try:
                    queue = queue or Queue(self.queue_path)
                    if not queue.heartbeat(self.job, self.lease):
                        self.lost = True
                        log.warning("job %d: lease lost (another worker took it over)", self.job.id)
                        return
                except QueueError as exc:  # a locked or full database: try again at the next beat
                    log.warning("job %d: heartbeat not recorded: %s", self.job.id, exc)
        finally:
            if queue is not None:
                queue.close()


class Worker:
    def __init__(
        self,
        workspace: str | Path | None = None,
        config: WorkerConfig | None = None,
        uri: str | None = None,
        name: str | None = None,
    ):
        self.state = State(workspace).ensure()
        self.workspace = self.state.workspace
        self.config = config or WorkerConfig()
        self.uri = uri
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = Queue(self.state.queue_db)
        self.stage_env: dict[str, str] = {}  # added to the stages' environment (the Ray backend's pool)
        self.stage_server: Any = None  # pipelines.stage_server.StageServer: the stages fork from it
        self._lock_fd: int | None = None
        for key, value in CLIENT_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)

    # -- the loop ----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Become the workspace's only worker, and release the jobs a dead worker left running."""
        import fcntl

        fd = os.open(self.state.worker_lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.state.worker_lock.read_text().strip() or "?"
            raise XAIError(f"another worker ({holder}) is running in {self.workspace}") from None
        os.ftruncate(fd, 0)
        os.write(fd, self.name.encode())
        self._lock_fd = fd
        released = self.queue.release_orphans(self.name)
        if released:
            log.info("picked up %d job(s) left running by a worker that stopped", released)

    def run(
        self, once: bool = False, max_jobs: int | None = None, stop: threading.Event | None = None
    ) -> int:
        """Process jobs until stopped (``once``: until nothing is ready). Returns the jobs processed."""
        if self._lock_fd is None:
            self.acquire()
        done = 0
        stop = stop or threading.Event()
        while not stop.is_set() and (max_jobs is None or done < max_jobs):
            try:
                job = self.queue.claim(self.name, self.config.lease)
            except QueueError as exc:  # locked, disk full, corrupt: wait, do not die
                log.error("worker: %s; trying again in %.0fs", exc, self.config.backoff)
                if once:
                    break
                stop.wait(self.config.backoff)
                continue
            if job is None:
                if once:
                    break
                stop.wait(self.config.poll)
                continue
            self.process(job)
            done += 1
        return done

    def process(self, job: Job) -> bool:
        """One attempt at one job; True when it is done."""
        uri = self.uri or ""
        log.info(
            "job %d %s %s: attempt %d/%d", job.id, job.model, job.version, job.attempts, job.max_attempts
        )
        started = time.monotonic()
        try:
            uri = self.uri or tracking_uri(self.workspace)
            with Heartbeat(self.state.queue_db, job, self.config.lease) as beat:
                run_id, verdict = self.execute(job, uri)
            if beat.lost:
                log.warning(
                    "job %d: finished after its lease was lost; the new holder reuses run %s", job.id, run_id
                )
                return False
            try:
                self.queue.complete(
                    job, run_id, {"gate": verdict.get("status"), "passed": verdict.get("passed")}
                )
            except QueueError as exc:  # the run is logged: the retry after the lease finds it complete
                log.error(
                    "job %d: done, but not recorded in the queue (%s); it is retried when its lease "
                    "runs out and reuses run %s",
                    job.id,
                    exc,
                    run_id,
                )
                return False
            log.info(
                "job %d %s %s: done in %.1fs, gate %s, run %s",
                job.id,
                job.model,
                job.version,
                time.monotonic() - started,
                verdict.get("status"),
                run_id,
            )
            return True
        except Exception as exc:
            self.failed(job, describe(exc, uri or "(none)"), uri)
            return False

    def failed(self, job: Job, error: JobError, uri: str) -> None:
        try:
            updated = self.queue.fail(
                job, error.reason, error.retryable, self.config.backoff, self.config.backoff_cap
            )
        except QueueError as exc:  # e.g. the disk is full: the lease runs out and the job is retried
            log.error(
                "job %d %s %s failed: %s; not recorded in the queue (%s): retried when its lease runs out",
                job.id,
                job.model,
                job.version,
                error.reason,
                exc,
            )
            return
        if updated is None:
            log.warning("job %d failed after its lease was lost: %s", job.id, error.reason)
            return
        retry = updated.state == "queued"
        when = f"retry in {updated.next_run_at - time.time():.0f}s" if retry else "giving up"
        log.error(
            "job %d %s %s failed (attempt %d/%d): %s; %s",
            job.id,
            job.model,
            job.version,
            updated.attempts,
            updated.max_attempts,
            error.reason,
            when,
        )
        if uri:
            self._tag_failure(job, updated, error, uri, retry)

    def _tag_failure(self, job: Job, updated: Job, error: JobError, uri: str, retry: bool) -> None:
        try:
            check_name(job.model), check_version(job.version)
            client = _client(uri)
            attempts = f"{updated.attempts}/{updated.max_attempts}"
            tags = {
                "xai.status": "failed",
                "xai.error": error.reason[:5000],
                "xai.attempts": attempts,
                "xai.retry": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(updated.next_run_at))
                if retry
                else "no",
            }
            for key, value in tags.items():
                client.set_model_version_tag(job.model, job.version, key, value)
        except Exception as exc:  # MLflow down, or the version does not exist
            log.info(
                "job %d: could not tag the failure on the version (%s)",
                job.id,
                redact_text(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__),
            )

    # -- one attempt -------------------------------------------------------------------------
    def execute(self, job: Job, uri: str) -> tuple[str, dict[str, Any]]:
        """Run the version's pipeline and log it; returns (run id, verdict)."""
        from pipelines.api import run_version

        name, version = check_name(job.model), check_version(job.version)
        client = _client(uri)
        _require_version(client, name, version)
        client.set_model_version_tag(name, version, "xai.status", "running")
        client.set_model_version_tag(name, version, "xai.config", job.config)
        run_id, complete = runlog.find_or_start(client, experiment_name(), job.key, name, version, job.config)
        if complete:
            verdict = runlog.logged_verdict(client, run_id)
            log.info("job %d: run %s already holds this version's results; not run again", job.id, run_id)
        else:
            try:
                result = run_version(
                    self.workspace,
                    name,
                    version,
                    uri=f"models:/{name}/{version}",
                    env={
                        **self.stage_env,
                        **self._warm_stages(),
                        "MLFLOW_TRACKING_URI": uri,
                        "MLFLOW_RUN_ID": run_id,
                    },
                    timeout=self.config.job_timeout,
                )
                verdict = runlog.log_outputs(client, run_id, result, self.workspace)
                runlog.finish(client, run_id, verdict)
            except Exception as exc:
                try:
                    runlog.fail(client, run_id, describe(exc, uri).reason)
                except Exception:
                    pass
                raise
        status = str(verdict.get("status") or ("passed" if verdict.get("passed") else "failed"))
        for key, value in (("xai.gate", status), ("xai.run_id", run_id), ("xai.status", "done")):
            client.set_model_version_tag(name, version, key, value)
        _clear_failure_tags(client, name, version)
        return run_id, verdict

    def _warm_stages(self) -> dict[str, str]:
        """The stage server's environment once it listens; {} (cold stages, said once) without."""
        if self.stage_server is None:
            return {}
        env = self.stage_server.wait()
        if not env and self.stage_server.error:
            log.warning("no warm stage server (%s): each stage starts cold", self.stage_server.error)
            self.stage_server.error = None
        return env


def _client(uri: str) -> Any:
    from registry.models import client_for

    return client_for(uri)


def _require_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            raise JobError(f"model version {name} {version} does not exist in the registry") from None
        raise


def _clear_failure_tags(client: Any, name: str, version: str) -> None:
    tags = client.get_model_version(name, version).tags or {}
    for key in ("xai.error", "xai.retry", "xai.attempts"):
        if key in tags:
            client.delete_model_version_tag(name, version, key)
