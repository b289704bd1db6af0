"""One session per run: what a run derives from a model, kept for that run and no longer.

A run derives objects from the model it explains: a copy with BatchNorm folded into the
convolutions and its TorchScript freeze (``core.fastpath``), the default layer
(``core.layers.default_layer``), LRP's folded parameters and prepared rules, a copy of every
parameter to restore the model from (``core.hooks.ModelState``), a model retrained on permuted
labels (the sanity check). They live in the :class:`Session` of the run, never in a module-level
dictionary keyed on models: such a cache must guess on every call whether the model changed (object
ids, tensor version counters, checksums; a write through ``.data`` bumps no counter), and each way
of guessing has missed a change once. A session does not guess: it ends with the run.

``Engine.run`` opens one (inside the model-preserving context); ``with session(model):`` keeps one
open across calls for a loop over batches, the caller promising not to change the model's weights
inside (a weight written through ``.data`` between two calls of one session is that promise
broken: the later call may use copies derived from the old weights; between two sessions the new
weights are always seen). Code that changes the weights inside a session on purpose (the sanity
check re-initializing layers step by step) says so with :meth:`Session.weights_changed`.

Two tiers: ``structural`` objects depend on the modules and input shapes only (the default layer,
a retrained copy), ``derived`` ones on the weights too (folded copies, prepared rules); a session of
a structural copy (``session(copy, like=model)``) starts with its model's structural objects, and
one over the very same tensors (``same_tensors``) shares its snapshots too. The snapshots
``ModelState`` restores from are compared by content before reuse, so they stay right even when
the promise is broken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

__all__ = ["Session", "session", "current_session", "derived", "structural"]


class Session:
    """What runs derive from ``model`` while the session is open (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._structural: dict[Hashable, Any] = {}
        self._derived: dict[Hashable, Any] = {}
        # id(tensor) -> (tensor, CPU copy of its values): held, so an id is never reused meanwhile
        self.snapshots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def structural(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()`` once per session: an object that depends on the modules and shapes only."""
        if key not in self._structural:
            self._structural[key] = build()
        return self._structural[key]

    def derived(self, key: Hashable, build: Callable[[], T]) -> T:
        """``build()`` once per session, or per :meth:`weights_changed`: depends on the weights."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def weights_changed(self) -> None:
        """The caller changed the model's weights: what was derived from them is dropped."""
        self._derived.clear()


_OPEN: ContextVar[tuple[Session, ...]] = ContextVar("xai_open_sessions", default=())


def current_session(model: nn.Module) -> Session | None:
    """The innermost open session of ``model`` (the very object), or None."""
    for s in reversed(_OPEN.get()):
        if s.model is model:
            return s
    return None


@contextlib.contextmanager
def session(model: nn.Module, like: nn.Module | None = None, same_tensors: bool = False) -> Iterator[Session]:
    """Keep what runs derive from ``model`` until the block ends (one is already open for
    ``model``: that one). ``like``: ``model`` is a structural copy of ``like`` (same modules, other
    weights): the new session starts with the structural objects of ``like``'s open session;
    ``same_tensors``: the copy holds ``like``'s very parameter and buffer tensors, so it shares
    that session's snapshots (each is checked by content before reuse: no copy of the weights is
    taken twice)."""
    open_one = current_session(model)
    if open_one is not None:
        yield open_one
        return
    s = Session(model)
    parent = current_session(like) if like is not None else None
    if parent is not None:
        s._structural.update(parent._structural)
        if same_tensors:
            s.snapshots = parent.snapshots
    token = _OPEN.set((*_OPEN.get(), s))
    try:
        yield s
    finally:
        _OPEN.reset(token)


def structural(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, kept in ``model``'s open session if there is one (see ``Session.structural``)."""
    s = current_session(model)
    return build() if s is None else s.structural(key, build)


def derived(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, kept in ``model``'s open session if there is one (see ``Session.derived``)."""
    s = current_session(model)
    return build() if s is None else s.derived(key, build)
