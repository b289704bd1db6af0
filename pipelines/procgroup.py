"""``dvc`` in a process group that dies with its parent.

``run_dvc`` starts ``python -m pipelines.procgroup ARGS`` (dvc's own ``main``) as the leader of a
new session, so dvc and the stage commands it runs share one process group. On Linux the leader
gets ``SIGTERM`` when its parent dies, even by ``SIGKILL`` (``prctl(PR_SET_PDEATHSIG)``, set in
``preexec_fn``), and answers any ``SIGTERM`` by killing the whole group: a killed worker or
``xai pipeline run`` leaves no ``dvc repro`` behind to block the next run with "is busy" (DVC skips
the lock entries of processes that no longer exist). The parent also kills the group when it stops
waiting (an exception, ``KeyboardInterrupt``, a time-out) and at exit (:func:`kill_live_groups`).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1

_live: set[int] = set()  # process groups started by this process and not yet finished
_live_guard = threading.Lock()


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A ``preexec_fn`` (or a function a forked child calls first): the child gets ``sig`` when
    this process (``parent``) dies (Linux only). ``prctl`` is looked up here, before the fork: the
    child only calls it (no dlopen after fork)."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def track(pgid: int) -> None:
    """Remember a live process group, to kill at exit."""
    with _live_guard:
        _live.add(pgid)


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` (gone already: nothing to do); forget it."""
    with _live_guard:
        _live.discard(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def kill_live_groups() -> None:
    """Kill every group this process started that still runs (at interpreter exit)."""
    for pgid in list(_live):
        kill_group(pgid)


def _kill_own_group(signum: int, _frame: object) -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run dvc with ``argv``; a SIGTERM (the parent died, or asked) kills this whole group."""
    signal.signal(signal.SIGTERM, _kill_own_group)
    from dvc.cli import main as dvc_main

    return dvc_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
