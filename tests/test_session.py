"""Issue 18: one session per run holds what the run derives from the model (core.session).

Inside one ``with session(model):`` block the caller promises not to change the weights: a write
through ``.data`` there is the promise broken and may be missed (documented). Between sessions,
and between plain calls, every change is seen. No module-level cache keyed on models remains.
"""

from __future__ import annotations

import copy
import gc
import importlib
import pkgutil
import weakref

import pytest
import torch
from torch import nn

import core
import xai_plugins
from core.api import explain, session
from xai_plugins.toolkit import derived, fast_forward, structural

METHODS = ("saliency", "grad_cam", "lrp", "occlusion", "score_cam")


def _bn_cnn(seed: int = 0) -> nn.Module:
    """A conv-BN-ReLU CNN with trained-like BatchNorm statistics (the fast path folds them)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _explain_all(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    targets = torch.tensor([0, 1, 2])
    return {m: explain(model, x, targets, method=m, progress=False).attributions for m in METHODS}


def test_a_data_write_inside_one_session_is_the_promise_broken(images):
    """Documented: inside one session the derived copies (here the BatchNorm-folded copy) are kept,
    so a weight written through ``.data`` there is not seen by them; ``weights_changed`` says it."""
    model = _bn_cnn()
    with session(model) as s, torch.no_grad():
        first = fast_forward(model)
        before = first(images)
        model[0].weight.data.mul_(2.0)  # no version bump, and inside the session: promise broken
        again = fast_forward(model)
        assert again.path is first.path  # the same derived copies: the change is missed
        assert torch.allclose(again(images), before, atol=1e-6)
        assert not torch.allclose(model(images), before, atol=1e-3)
        s.weights_changed()  # the caller owning up: derived copies are rebuilt
        rebuilt = fast_forward(model)
        assert rebuilt.path is not first.path
        assert torch.allclose(rebuilt(images), model(images), atol=1e-4)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding, relative to the larger map's scale (LRP maps are ~1e-5)."""
    return bool((a - b).abs().max() <= 1e-4 * max(a.abs().max(), b.abs().max()))


def test_between_sessions_and_plain_calls_every_data_write_is_seen(images):
    """Every explanation after a ``.data`` write equals a fresh model's with those weights."""
    model = _bn_cnn()
    with session(model):
        before = _explain_all(model, images)
    model[0].weight.data.mul_(-1.5)
    model[1].running_var.data.mul_(3.0)  # a buffer too
    fresh = copy.deepcopy(model)
    with session(model):
        after_session = _explain_all(model, images)
    after_plain = _explain_all(model, images)
    reference = _explain_all(fresh, images)
    for method in METHODS:
        assert not _close(before[method], reference[method]), method
        assert _close(after_session[method], reference[method]), method
        assert _close(after_plain[method], reference[method]), method


def test_derived_and_structural_objects_last_for_the_session_only():
    model = _bn_cnn()
    builds = []

    def build() -> object:
        builds.append(1)
        return object()

    assert derived(model, "k", build) is not derived(model, "k", build)  # no session: each call
    with session(model) as s:
        a = derived(model, "k", build)
        assert derived(model, "k", build) is a
        shape = structural(model, "shape", build)
        s.weights_changed()
        assert derived(model, "k", build) is not a  # weights changed: derived rebuilt
        assert structural(model, "shape", build) is shape  # modules did not change
        twin = copy.deepcopy(model)
        with session(twin, like=model):
            assert structural(twin, "shape", build) is shape  # a structural copy shares it
    with session(model):
        assert structural(model, "shape", build) is not shape  # a new session starts empty
    assert len(builds) == 6


def _project_modules() -> list:
    mods = []
    for package in (core, xai_plugins):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                mods.append(importlib.import_module(info.name))
            except ImportError:  # an optional extra (ray, timm, lxt) not installed
                continue
    return mods


def test_no_module_level_cache_keyed_on_models_remains(images):
    """No module of core or xai_plugins keeps a weak mapping or set (the old model-keyed caches),
    and after a run no module-level container holds the model or its id, nor keeps it alive."""
    weak = (weakref.WeakKeyDictionary, weakref.WeakValueDictionary, weakref.WeakSet)
    modules = _project_modules()
    offenders = [
        f"{m.__name__}.{name}" for m in modules for name, value in vars(m).items() if isinstance(value, weak)
    ]
    assert not offenders, offenders
    model = _bn_cnn()
    _explain_all(model, images)
    key = id(model)
    holders = [
        f"{m.__name__}.{name}"
        for m in modules
        for name, value in vars(m).items()
        if isinstance(value, (dict, set, list))
        and any(k is model or (type(k) is int and k == key) for k in list(value))
    ]
    assert not holders, holders
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None  # nothing the run left behind keeps the model alive
