"""The plugin host: built-ins, entry points from a real (throw-away) distribution, blocking,
duplicate names, check_pending, and fault isolation."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pluggy
import pytest
import torch

from core.engine import Engine
from core.errors import PluginError, UnknownNameError
from core.plugins import DuplicateNameError, PluginHost
from xai_plugins import Explainer, hookimpl

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str, *classes, hook: str = "xai_explainers") -> types.ModuleType:
    mod = types.ModuleType(name)

    def provide():
        return list(classes)

    provide.__name__ = hook
    setattr(mod, hook, hookimpl(provide))
    return mod


def _host_with(*modules: types.ModuleType) -> PluginHost:
    host = PluginHost(load_entry_points=False)
    for m in modules:
        host.pm.register(m, name=m.__name__)
        from core.plugins import PluginInfo

        host.infos[m.__name__] = PluginInfo(m.__name__, "test", "0")
    host._classes = None
    return host


class Raising(Explainer):
    name = "raising"
    space = "map"

    def explain(self, model, inputs, targets):
        raise RuntimeError("boom")


class WrongShape(Explainer):
    name = "wrong_shape"

    def explain(self, model, inputs, targets):
        return torch.zeros(inputs.shape[0], 5)


class NaNs(Explainer):
    name = "nans"

    def explain(self, model, inputs, targets):
        return torch.full_like(inputs, float("nan"))


class Sleepy(Explainer):
    name = "sleepy"

    def explain(self, model, inputs, targets):
        import time

        for _ in range(400):
            time.sleep(0.01)
        return torch.zeros_like(inputs)


class HookLeaver(Explainer):
    name = "hook_leaver"

    def explain(self, model, inputs, targets):
        next(model.modules()).register_forward_hook(lambda *a: None)
        raise RuntimeError("left a hook and failed")


def test_builtins_registered():
    host = PluginHost(load_entry_points=False)
    assert {"saliency", "grad_cam"} <= set(host.names("explainer"))
    assert {"json", "html"} <= set(host.names("reporter"))
    assert "localization" in host.names("metric")
    with pytest.raises(UnknownNameError, match="saliency"):
        host.get("explainer", "no_such_method")


def test_duplicate_name_names_both_plugins():
    host = _host_with(
        _module("plugin_a", Raising), _module("plugin_b", type("R2", (Raising,), {"name": "raising"}))
    )
    with pytest.raises(DuplicateNameError) as info:
        host.names("explainer")
    assert "plugin_a" in str(info.value) and "plugin_b" in str(info.value)


def test_check_pending_rejects_unknown_hook():
    mod = types.ModuleType("typo_plugin")
    mod.xai_explainerz = hookimpl(lambda: [])
    pm = pluggy.PluginManager("xai")
    from core import hookspecs

    pm.add_hookspecs(hookspecs)
    pm.register(mod)
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


def test_disabled_plugins_are_blocked(monkeypatch):
    monkeypatch.setenv("XAI_DISABLED_PLUGINS", "cam")
    host = PluginHost(load_entry_points=False)
    assert "grad_cam" not in host.names("explainer")
    assert "saliency" in host.names("explainer")


@pytest.mark.parametrize("cls,kind", [(Raising, "exception"), (WrongShape, "shape"), (NaNs, "nan")])
def test_faulty_plugin_is_isolated(functional_relu_cnn, images32, cls, kind):
    host = _host_with(_module("faulty", cls))
    out = Engine(host=host, progress=False).run(functional_relu_cnn, images32, [cls.name, "saliency"])
    assert "saliency" in out.explanations, "the good method still ran"
    assert [f.kind for f in out.failures] == [kind]
    assert out.failures[0].plugin == "faulty" and out.failures[0].name == cls.name


def test_timeout_is_isolated_and_hooks_restored(functional_relu_cnn, images32):
    host = _host_with(_module("slow", Sleepy, HookLeaver))
    out = Engine(host=host, progress=False, timeout=0.5).run(
        functional_relu_cnn, images32, ["sleepy", "hook_leaver", "grad_cam"]
    )
    kinds = {f.name: f.kind for f in out.failures}
    assert kinds == {"sleepy": "timeout", "hook_leaver": "exception"}
    assert "grad_cam" in out.explanations
    assert all(not m._forward_hooks for m in functional_relu_cnn.modules())


def test_failure_raises_in_public_api(functional_relu_cnn, images32):
    host = _host_with(_module("faulty", WrongShape))
    with pytest.raises(PluginError, match="shape"):
        Engine(host=host, progress=False).run(functional_relu_cnn, images32, ["wrong_shape"], isolate=False)


PLUGIN_SOURCE = '''
import torch
from xai_plugins import Explainer, hookimpl


class Centre(Explainer):
    """Relevance on the image centre (a throw-away third-party plugin)."""
    name = "centre_prior"
    space = "map"
    params = {"radius": 0.25}

    def explain(self, model, inputs, targets):
        b, _, h, w = inputs.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        m = ((yy**2 + xx**2).sqrt() < self.config["radius"] * 2).float()
        return m.expand(b, 1, h, w).clone()


@hookimpl
def xai_explainers():
    return [Centre]
'''


@pytest.fixture
def throwaway_distribution(tmp_path: Path) -> Path:
    """A real distribution (dist-info with an entry point) on a path of its own."""
    site = tmp_path / "site"
    (site / "centre_plugin").mkdir(parents=True)
    (site / "centre_plugin" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = site / "xai_centre_plugin-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xai-centre-plugin\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[xai]\ncentre = centre_plugin\n")
    (info / "RECORD").write_text("")
    return site


def test_entry_point_plugin_found_and_run(throwaway_distribution, tmp_path, trained_cnn_path):
    env = {**os.environ, "PYTHONPATH": str(throwaway_distribution), "XAI_NO_PROGRESS": "1"}
    xai = [sys.executable, "-m", "core.cli"]
    listing = subprocess.run(xai + ["plugins"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert listing.returncode == 0, listing.stderr
    assert "xai-centre-plugin 0.3" in listing.stdout and "centre_prior" in listing.stdout
    probe = tmp_path / "probe"
    subprocess.run(
        xai + ["data", "shapes", "--out", str(probe), "--n", "4"],
        check=True,
        env=env,
        cwd=ROOT,
        capture_output=True,
    )
    run = subprocess.run(
        xai
        + [
            "explain",
            "--model",
            str(trained_cnn_path),
            "--images",
            str(probe / "images"),
            "--methods",
            "centre_prior,saliency",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    import json

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == {"centre_prior", "saliency"}
    disabled = subprocess.run(
        xai + ["plugins"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**env, "XAI_DISABLED_PLUGINS": "centre"},
    )
    assert "centre_prior" not in disabled.stdout


def test_plugins_command_lists_distribution_and_names():
    out = subprocess.run(
        [sys.executable, "-m", "core.cli", "plugins", "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
    )
    assert out.returncode == 0, out.stderr
    import json

    infos = json.loads(out.stdout)
    by_name = {i["name"]: i for i in infos}
    assert "grad_cam" in by_name["xai_plugins.explainers.cam"]["provides"]["explainer"]
    assert all(i["version"] for i in infos)
    assert by_name["xai_plugins.explainers.cam"]["distribution"].startswith("xai-mlops")
