"""Issue 18: one door for plugins (xai_plugins and xai_plugins.toolkit), every built-in loaded,
fitted state in the user's cache directory rather than the working directory."""

from __future__ import annotations

import ast
from pathlib import Path

from core.hookspecs import hookimpl  # noqa: F401  (the marker the built-ins use)
from core.plugins import BUILTIN_PLUGINS, KINDS, PluginHost

ROOT = Path(__file__).resolve().parent.parent


def _hook_modules() -> set[str]:
    """Modules under xai_plugins that implement one of the host's plugin hooks."""
    found = set()
    for path in (ROOT / "xai_plugins").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        if names & set(KINDS.values()):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            found.add(".".join(parts))
    return found


def test_every_builtin_module_with_hooks_is_listed_and_loads():
    listed = set(BUILTIN_PLUGINS)
    hooks = _hook_modules()
    # a module with hooks is listed itself or is a submodule of a listed package that imports it
    unlisted = {m for m in hooks if m not in listed and not any(m.startswith(p + ".") for p in listed)}
    assert not unlisted, f"built-in modules with hooks missing from BUILTIN_PLUGINS: {sorted(unlisted)}"
    host = PluginHost(load_entry_points=False)
    assert host.load_errors == {}, host.load_errors
    assert set(host.infos) == listed


def test_a_broken_builtin_is_recorded_not_skipped():
    host = PluginHost(load_entry_points=False, builtins=("xai_plugins.explainers.no_such_family",))
    assert "xai_plugins.explainers.no_such_family" in host.load_errors


def test_fitted_state_lives_in_the_user_cache_not_the_working_directory(monkeypatch, tmp_path):
    from core.fitting import fit_root

    monkeypatch.delenv("XAI_FIT_DIR", raising=False)
    monkeypatch.delenv("XAI_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert fit_root() == tmp_path / "cache" / "xai" / "fitted" and fit_root().is_absolute()
    monkeypatch.setenv("XAI_HOME", str(tmp_path / "home"))
    assert fit_root() == tmp_path / "home" / "fitted"
    monkeypatch.setenv("XAI_FIT_DIR", str(tmp_path / "fit"))
    assert fit_root() == tmp_path / "fit"


def test_builtin_plugins_import_no_core_module_directly():
    """The import-linter contract's promise, read from the source: a third party can do whatever a
    built-in does with xai_plugins and xai_plugins.toolkit alone."""
    offenders = []
    for path in (ROOT / "xai_plugins").rglob("*.py"):
        if path.name in ("toolkit.py",) or path.parent == ROOT / "xai_plugins" and path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            )
            offenders += [
                f"{path.relative_to(ROOT)}: {m}" for m in mods if m == "core" or m.startswith("core.")
            ]
    assert not offenders, offenders


def test_one_baseline_vocabulary_with_zeros_by_default_everywhere():
    import torch

    from core.errors import InputError
    from core.plugins import get_host
    from xai_plugins.toolkit import resolve_baseline

    x = torch.rand(3, 2, 4, 4)
    assert torch.equal(resolve_baseline(None, x), torch.zeros(1, 2, 4, 4))
    assert torch.equal(resolve_baseline(0.5, x), torch.full((1, 2, 4, 4), 0.5))
    assert torch.equal(resolve_baseline(torch.tensor(0.5), x), torch.full((1, 2, 4, 4), 0.5))
    assert torch.allclose(resolve_baseline("mean", x), x.mean((2, 3), keepdim=True).expand_as(x))
    assert resolve_baseline(torch.ones(2, 4, 4), x).shape == (1, 2, 4, 4)
    assert resolve_baseline(torch.ones(3, 2, 4, 4), x).shape == (3, 2, 4, 4)
    for bad in ("random-ish", True, torch.ones(2, 2, 4, 4), [object()]):
        try:
            resolve_baseline(bad, x)
        except InputError as err:
            assert "\n" not in str(err)
        else:
            raise AssertionError(f"{bad!r} accepted")
    host = get_host()
    defaults = {
        m: host.get("explainer", m).params["baseline"]
        for m in host.names("explainer")
        if "baseline" in getattr(host.get("explainer", m), "params", {})
    }
    assert "integrated_gradients" in defaults and "gradient_shap" in defaults
    assert {m: d for m, d in defaults.items() if d not in (None, "zeros")} == {}
