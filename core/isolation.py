"""Run plugin code so that an exception, a hang past its time limit, a wrong shape or a NaN is
recorded against the plugin instead of stopping the run."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from core.errors import PluginError, PluginTimeout

T = TypeVar("T")


def call_with_timeout(fn: Callable[[], T], timeout: float | None, plugin: str = "?") -> T:
    """Call ``fn``; with a ``timeout`` (seconds) run it in a thread and stop it when it overruns.

    The overrunning thread receives ``PluginTimeout`` asynchronously (at its next Python bytecode),
    so its ``finally`` blocks still remove hooks before we restore the model.
    """
    if not timeout:
        return fn()
    box: dict[str, Any] = {}
    grad_enabled = torch.is_grad_enabled()

    def target() -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):
                box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - transported to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"xai-plugin-{plugin}")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(PluginTimeout))
        thread.join(10.0)
        raise PluginError(plugin, "timeout", f"ran past its time limit of {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite. A NaN or infinity makes the sum non-finite, so a finite sum
    (one reduction, no temporary the size of the tensor) settles it; only a non-finite sum (maybe an
    overflow of large finite values) needs the elementwise check."""
    if not tensor.is_floating_point() and not tensor.is_complex():
        return True
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def check_tensor(plugin: str, tensor: Any, batch: int, what: str = "attributions") -> torch.Tensor:
    """Validate a plugin's output tensor: a tensor, batch-first, finite."""
    if not isinstance(tensor, torch.Tensor):
        raise PluginError(plugin, "shape", f"returned {type(tensor).__name__}, expected a tensor of {what}")
    if tensor.dim() < 3 or tensor.shape[0] != batch:
        raise PluginError(plugin, "shape", f"{what} have shape {tuple(tensor.shape)}, expected {batch} x ... x H x W")
    if not all_finite(tensor):
        raise PluginError(plugin, "nan", f"{what} contain NaN or infinite values")
    return tensor
