"""Drop the entries of dvc's ``.dvc/tmp/rwlock`` whose process is dead or a zombie.

dvc records the pid of every ``dvc repro`` holding an output and refuses a second run ("is busy")
while that pid exists. A killed ``dvc repro`` whose parent died is re-parented to the machine's
init; where init does not reap (PID 1 of many containers), it stays a zombie, its pid still exists,
and every later run is refused. dvc skips pids that do not exist; this also skips zombies.
A dvc killed while it rewrote the file leaves it empty or cut off, and dvc then refuses every run
("JSON structure is corrupted"); such a file holds no live entry and is removed (dvc starts a new one).
Callers hold the workspace lock (:mod:`pipelines.lock`), so no live dvc writes the file meanwhile.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (not gone, not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: existence is all we can tell
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _live(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("pid"), int) and process_alive(entry["pid"])


def drop_dead_holders(workspace: Path) -> list[int]:
    """Remove rwlock entries of dead or zombie processes; returns their pids (none: file untouched).
    A file that is not a JSON object (cut off by a kill mid-write) is removed; returns ``[-1]``."""
    path = Path(workspace) / ".dvc" / "tmp" / "rwlock"
    try:
        text = path.read_text()
    except OSError:
        return []
    try:
        lock = json.loads(text)
    except ValueError:
        lock = None
    if not isinstance(lock, dict):
        path.unlink(missing_ok=True)
        return [-1]
    dropped: list[int] = []
    writes = lock.get("write") or {}
    for out, entry in list(writes.items()):
        if not _live(entry):
            dropped.append(entry.get("pid") if isinstance(entry, dict) else -1)
            del writes[out]
    reads = lock.get("read") or {}
    for out, entries in list(reads.items()):
        kept = [e for e in entries if _live(e)] if isinstance(entries, list) else []
        dropped += [e.get("pid", -1) for e in entries if e not in kept and isinstance(e, dict)]
        if kept:
            reads[out] = kept
        else:
            del reads[out]
    if dropped:
        tmp = path.with_name("rwlock.xai-tmp")
        tmp.write_text(json.dumps({"write": writes, "read": reads}))
        os.replace(tmp, path)
    return dropped
