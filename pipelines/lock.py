"""The workspace lock: one writer of params.yaml / one ``dvc repro`` per workspace at a time.

DVC itself refuses a second ``dvc repro`` in the same repository while one runs ("Unable to acquire
lock"), so workers that share a workspace queue up on this lock instead of failing. It is an OS file
lock (``flock``; ``msvcrt.locking`` on Windows) on ``.xai/pipeline.lock``, released when the holder
exits or dies, and reentrant within one process (``run_version`` writes params.yaml while holding it).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import XAIError

LOCK_FILE = Path(".xai") / "pipeline.lock"


class _Slot:
    """Per-process state of one lock file: a thread lock, the nesting depth and the open file."""

    def __init__(self) -> None:
        self.rlock = threading.RLock()
        self.depth = 0
        self.fd: int | None = None


_slots: dict[str, _Slot] = {}
_guard = threading.Lock()


def _try_lock(fd: int) -> bool:
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True


def _unlock(fd: int) -> None:
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _acquire_file(path: Path, timeout: float | None) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not _try_lock(fd):
        if deadline is not None and time.monotonic() > deadline:
            os.close(fd)
            raise XAIError(f"timed out after {timeout:.0f} s waiting for the pipeline lock {path}")
        time.sleep(0.1)
    return fd


@contextmanager
def workspace_lock(workspace: str | Path, timeout: float | None = None) -> Iterator[None]:
    """Hold the workspace's lock; wait for it (``timeout`` seconds, None = forever)."""
    path = (Path(workspace) / LOCK_FILE).resolve()
    with _guard:
        slot = _slots.setdefault(str(path), _Slot())
    if not slot.rlock.acquire(timeout=-1 if timeout is None else timeout):
        raise XAIError(f"timed out after {timeout:.0f} s waiting for the pipeline lock {path}")
    try:
        if slot.depth == 0:
            slot.fd = _acquire_file(path, timeout)
        slot.depth += 1
        try:
            yield
        finally:
            slot.depth -= 1
            if slot.depth == 0 and slot.fd is not None:
                _unlock(slot.fd)
                os.close(slot.fd)
                slot.fd = None
    finally:
        slot.rlock.release()
