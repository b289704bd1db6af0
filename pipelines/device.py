"""The device a stage runs on: never a tracked parameter, so moving to a GPU invalidates nothing.

``--device`` or ``XAI_DEVICE`` (cpu, cuda, cuda:1, ...) win. Otherwise ("auto"): the CPU without
CUDA, the GPU with one; with several GPUs each stage process claims a free one through an OS lock
file (``<tmp>/xai-gpu-<i>.lock``, held until the process exits), so the parallel experiments of
``dvc queue start -j N`` spread over N GPUs even though they share one environment. When every GPU
is taken, the version key picks one (deterministically) to share.
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path

import torch

_claimed: list[int] = []  # open lock files, kept for the life of the process


def _claim(index: int) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no claiming, share by key
        return False
    fd = os.open(Path(tempfile.gettempdir()) / f"xai-gpu-{index}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _claimed.append(fd)
    return True


def pick_device(key: str, requested: str | None = None) -> torch.device:
    """The device for the stage of version ``key`` (see the module docstring)."""
    choice = requested or os.environ.get("XAI_DEVICE") or "auto"
    if choice != "auto":
        return torch.device(choice)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if n == 1:
        return torch.device("cuda:0")
    start = zlib.crc32(key.encode()) % n
    for offset in range(n):
        index = (start + offset) % n
        if _claim(index):
            return torch.device(f"cuda:{index}")
    return torch.device(f"cuda:{start}")
