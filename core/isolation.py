"""Run plugin code so that an exception, a hang past its time limit, a wrong shape or a NaN is
recorded against the plugin instead of stopping the run.

Two ways to stop a plugin at its time limit (``ISOLATION_MODES``): ``"thread"`` (the default) raises
``PluginTimeout`` in the calling thread, where the plugin runs (again while it goes on), which a
plugin can catch and which waits while it blocks in C; ``"process"`` runs the call in a forked child
that is killed (SIGKILL) at the limit, so the plugin stops whatever it does, and nothing it does to
the model reaches the caller.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import pickle
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from core.errors import PluginError, PluginTimeout, XAIError
from core.hooks import ModelState

T = TypeVar("T")

DEFAULT_TIMEOUT = 600.0
"""Seconds one plugin call may take, unless the caller says otherwise (CLI, pipeline stages)."""

ISOLATION_MODES = ("thread", "process")


def call_isolated(fn: Callable[[], T], timeout: float | None, plugin: str = "?", mode: str = "thread") -> T:
    """Call ``fn`` under ``timeout`` seconds, in this process (``mode="thread"``) or a child process
    (``mode="process"``): the one door the engine and the workflow use for plugin code."""
    if mode == "process":
        return call_in_process(fn, timeout, plugin)
    if mode != "thread":
        raise PluginError(
            plugin, "config", f"isolate must be one of {', '.join(ISOLATION_MODES)}, got {mode!r}"
        )
    return call_with_timeout(fn, timeout, plugin)


def call_with_timeout(fn: Callable[[], T], timeout: float | None, plugin: str = "?") -> T:
    """Call ``fn`` in this thread; when it runs past ``timeout`` seconds a watchdog raises
    ``PluginTimeout`` in it asynchronously (at its next Python bytecode, again every
    ``RETRY_SECONDS`` while it goes on), so its ``finally`` blocks still remove hooks before the
    caller restores the model, and the caller never restores a model the plugin still runs on.

    Why this thread and not a fresh one per call: glibc gives a new thread its own malloc arena,
    whose large blocks go back to the system when freed, so every activation of a big model is
    page-faulted in again: AttnLRP on ViT-B/16 (batch 8, one core) took 12.0 s in a fresh thread
    against 7.7-8.1 s here. A plugin blocked in C, or one that swallows every time-out, keeps its
    caller waiting: ``isolate="process"`` is for plugins not trusted to stop.
    """
    if not timeout:
        return fn()
    ident = threading.get_ident()
    lock = threading.Lock()
    state = {"done": False, "fired": False}
    stopped = threading.Event()

    def watchdog() -> None:
        wait = timeout
        while not stopped.wait(wait):
            with lock:
                if state["done"]:
                    return
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(PluginTimeout)
                )
            wait = RETRY_SECONDS

    def finish() -> None:  # idempotent: no time-out is sent, or left pending, once it has run
        with lock:
            state["done"] = True
            if state["fired"]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)
        stopped.set()

    guard = threading.Thread(target=watchdog, daemon=True, name=f"xai-timeout-{plugin}")
    guard.start()
    error: BaseException | None = None
    try:
        value = fn()
    except BaseException as exc:  # noqa: BLE001 - re-raised below unless it is the time-out
        error = exc
    while True:
        try:
            finish()
            break
        except PluginTimeout:  # delivered while finishing: finish again
            continue
    if state["fired"]:
        raise PluginError(plugin, "timeout", f"ran past its time limit of {timeout:g} s")
    if error is not None:
        raise error
    return value


RETRY_SECONDS = 0.5
"""How often a plugin that swallowed its time-out is sent it again."""


def _portable_error(plugin: str, exc: BaseException) -> PluginError | XAIError:
    """An exception as one that pickles and reads the same in the parent (one line)."""
    if isinstance(exc, PluginError):
        return PluginError(exc.plugin, exc.kind, exc.message)
    if isinstance(exc, XAIError):
        return XAIError(str(exc))
    return PluginError(plugin, "exception", f"{type(exc).__name__}: {exc}")


def call_in_process(fn: Callable[[], T], timeout: float | None, plugin: str = "?") -> T:
    """Call ``fn`` in a forked child; kill it (SIGKILL) when it runs past ``timeout`` seconds.

    The result (or the error) comes back pickled through a pipe. A fork shares the model's memory
    copy-on-write, so nothing the plugin writes reaches this process. CUDA cannot be used after a
    fork, so a run that has started CUDA is refused in one line.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise PluginError(
            plugin, "config", "isolate='process' runs on the CPU only: a forked process cannot use CUDA"
        )
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    grad_enabled = torch.is_grad_enabled()

    def child() -> None:
        receiver.close()
        torch.set_num_threads(1)  # the parent's intra-op thread pool did not survive the fork
        try:
            with torch.set_grad_enabled(grad_enabled):
                payload: tuple[str, Any] = ("value", fn())
            data = pickle.dumps(payload)
        except BaseException as exc:  # noqa: BLE001 - transported to the parent
            data = pickle.dumps(("error", _portable_error(plugin, exc)))
        sender.send_bytes(data)
        sender.close()

    proc = ctx.Process(target=child, name=f"xai-plugin-{plugin}", daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise PluginError(plugin, "timeout", f"ran past its time limit of {timeout:g} s (process killed)")
        try:
            data = receiver.recv_bytes()
        except EOFError:
            proc.join(5.0)
            raise PluginError(plugin, "exception", f"its process died (exit code {proc.exitcode})") from None
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        receiver.close()
    kind, value = pickle.loads(data)  # noqa: S301 - our own child's bytes
    if kind == "error":
        raise value
    return value


def restore_or_fail(state: ModelState, plugin: str) -> None:
    """Restore what a plugin call changed in the model (``state``: taken before the call) and, if
    anything had changed, fail the call in one line (kind "model")."""
    changed = state.restore()
    if changed:
        shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise PluginError(plugin, "model", f"changed the model's parameters or buffers ({shown}); restored")


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
        raise PluginError(
            plugin, "shape", f"{what} have shape {tuple(tensor.shape)}, expected {batch} x ... x H x W"
        )
    if not all_finite(tensor):
        raise PluginError(plugin, "nan", f"{what} contain NaN or infinite values")
    return tensor
