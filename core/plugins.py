"""The plugin host: one pluggy manager, built-ins by module path, third parties by entry point.

Modelled on simonw/llm's ``plugins.py``: built-in plugins are listed by module path and loaded like
any other; ``XAI_DISABLED_PLUGINS=a,b`` blocks plugins by name; ``check_pending()`` catches hook
implementations that match no specification. Names provided through registration hooks are unique
across plugins: a clash is an error naming both plugins.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from core import hookspecs
from core.errors import UnknownNameError, XAIError

ENTRY_POINT_GROUP = "xai"

# Built-in plugins, registered by module path (each module holds @hookimpl functions).
BUILTIN_PLUGINS: tuple[str, ...] = (
    "xai_plugins.explainers.gradient",
    "xai_plugins.explainers.cam",
    "xai_plugins.explainers.relevance",
    "xai_plugins.explainers.perturbation",
    "xai_plugins.explainers.adversarial",
    "xai_plugins.explainers.surrogate",
    "xai_plugins.explainers.deconvolve",
    "xai_plugins.explainers.perception",
    "xai_plugins.explainers.transformer",
    "xai_plugins.metrics.localization",
    "xai_plugins.metrics.sanity",
    "xai_plugins.metrics.faithfulness",
    "xai_plugins.metrics.robustness",
    "xai_plugins.metrics.cost",
    "xai_plugins.metrics.deconvolve_metrics",
    "xai_plugins.metrics.perception_metrics",
    "xai_plugins.reporters.json_reporter",
    "xai_plugins.reporters.html",
    "xai_plugins.reporters.mlflow_reporter",
    "xai_plugins.metrics.drift",
    "xai_plugins.describers.template",
    "xai_plugins.describers.openai_compatible",
    "xai_plugins.bridges.captum_bridge",
    "xai_plugins.bridges.gradcam_bridge",
)

KINDS = {
    "explainer": "xai_explainers",
    "metric": "xai_metrics",
    "reporter": "xai_reporters",
    "describer": "xai_describers",
}


class DuplicateNameError(XAIError):
    pass


@dataclass
class PluginInfo:
    name: str
    distribution: str
    version: str
    provides: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None


class PluginHost:
    """Loads plugins once and answers: which class has this name, who provides what."""

    def __init__(self, load_entry_points: bool = True, builtins: tuple[str, ...] = BUILTIN_PLUGINS):
        self.pm = pluggy.PluginManager("xai")
        self.pm.add_hookspecs(hookspecs)
        self.infos: dict[str, PluginInfo] = {}
        self.load_errors: dict[str, str] = {}
        self._classes: dict[str, dict[str, tuple[type, str]]] | None = None  # all hooks called
        self._found: dict[str, dict[str, tuple[type, str]]] = {kind: {} for kind in KINDS}
        self._called: set[tuple[str, int]] = set()
        disabled = {n.strip() for n in os.environ.get("XAI_DISABLED_PLUGINS", "").split(",") if n.strip()}
        self.disabled = disabled
        own_version = _version("xai-mlops")
        for module_name in builtins:
            short = module_name.rsplit(".", 1)[-1]
            if short in disabled or module_name in disabled:
                continue
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # a broken built-in must not take the host down; tests fail on it
                self.load_errors[module_name] = f"{type(exc).__name__}: {exc}"
                continue
            self.pm.register(module, name=module_name)
            self.infos[module_name] = PluginInfo(module_name, "xai-mlops (built-in)", own_version)
        if load_entry_points:
            self._load_entry_points(disabled)
        self.pm.check_pending()

    def _load_entry_points(self, disabled: set[str]) -> None:
        for dist in metadata.distributions():
            for ep in dist.entry_points:
                if ep.group != ENTRY_POINT_GROUP or ep.name in disabled:
                    continue
                if self.pm.get_plugin(ep.name) is not None:
                    continue
                dist_name = dist.metadata["Name"] or "?"
                try:
                    plugin = ep.load()
                except Exception as exc:
                    self.load_errors[ep.name] = f"{type(exc).__name__}: {exc}"
                    self.infos[ep.name] = PluginInfo(ep.name, dist_name, dist.version, error=str(exc))
                    continue
                self.pm.register(plugin, name=ep.name)
                self.infos[ep.name] = PluginInfo(ep.name, dist_name, dist.version)

    # -- registration hooks -------------------------------------------------------------------
    def _collect(
        self, kind: str | None = None, name: str | None = None
    ) -> dict[str, dict[str, tuple[type, str]]]:
        """The classes of every registration hook (kind and name None), or enough of them to answer
        for ``name`` of ``kind``: a hook that declares its names (:func:`core.hookspecs.provides`)
        is called only when one of them matches, so a bridge's library is imported only when one of
        its methods is asked for. Each hook is called once; the answer is the same either way."""
        if self._classes is not None:
            return self._classes
        for k, hook_name in KINDS.items():
            if kind is not None and k != kind:
                continue
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                declared = getattr(impl.function, "xai_provides", None)
                if (k, id(impl.function)) in self._called or (
                    name is not None and declared is not None and not _matches(name, declared)
                ):
                    continue
                self._called.add((k, id(impl.function)))
                self._register_classes(k, hook_name, impl, declared)
        if kind is None:
            self._classes = self._found
        return self._found

    def _register_classes(
        self, kind: str, hook_name: str, impl: Any, declared: tuple[str, ...] | None
    ) -> None:
        plugin_name = self.pm.get_name(impl.plugin) or "?"
        classes = self._found[kind]
        try:
            provided = impl.function() or []
        except Exception as exc:
            self.load_errors[plugin_name] = f"{hook_name} raised {type(exc).__name__}: {exc}"
            return
        for cls in provided:
            name = getattr(cls, "name", "")
            if not name:
                self.load_errors[plugin_name] = f"{hook_name}: {cls!r} has no name"
                continue
            if declared is not None and not _matches(name, declared):
                self.load_errors[plugin_name] = (
                    f"{hook_name}: {name!r} is not among its declared names {declared}"
                )
                continue
            if name in classes:
                other = classes[name][1]
                raise DuplicateNameError(
                    f"{kind} name {name!r} is provided by two plugins: {other!r} and {plugin_name!r}"
                )
            classes[name] = (cls, plugin_name)
            info = self.infos.get(plugin_name)
            if info is not None:
                info.provides.setdefault(kind, []).append(name)

    def names(self, kind: str) -> list[str]:
        return sorted(self._collect()[kind])

    def get(self, kind: str, name: str) -> type:
        entry = self._collect(kind, name)[kind].get(name)
        if entry is None:
            raise UnknownNameError(kind, name, self.names(kind))
        return entry[0]

    def provider(self, kind: str, name: str) -> str:
        return self._collect(kind, name)[kind][name][1]

    def plugins(self) -> list[PluginInfo]:
        self._collect()
        return [
            info
            for info in self.infos.values()
            if info.provides or info.error or not info.distribution.endswith("(built-in)")
        ]

    @property
    def hook(self) -> Any:
        return self.pm.hook


_host: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _host
    if _host is None:
        _host = PluginHost()
    return _host


def explainer_flag(method: str, flag: str, host: PluginHost | None = None) -> bool:
    """A class flag of explainer ``method`` (``rowwise``, ``signed``, ...); False for a method the
    host does not know (a plugin that is gone: the conservative answer)."""
    try:
        return bool(getattr((host or get_host()).get("explainer", method), flag, False))
    except Exception:  # noqa: BLE001 - unknown or broken plugin
        return False


def signed_relevance(explanations: dict[str, Any]) -> dict[str, Any]:
    """label -> B x H x W channel-summed attributions, for the explanations whose method declares
    ``signed`` (drawn red/blue instead of as a min-max heat map)."""
    return {
        label: exp.attributions.sum(dim=1)
        for label, exp in explanations.items()
        if exp.attributions.dim() == 4 and explainer_flag(exp.method, "signed")
    }


def reset_host() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in-process)."""
    global _host
    _host = None
    importlib.invalidate_caches()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` is one of ``patterns`` (a trailing ``*`` matches any suffix: ``"captum_*"``)."""
    return any(name.startswith(p[:-1]) if p.endswith("*") else name == p for p in patterns)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def broadcast(hook_name: str, **kwargs: Any) -> list[str]:
    """Call a broadcast hook on every plugin, isolating failures; returns the failure messages."""
    host = get_host()
    errors: list[str] = []
    for impl in getattr(host.hook, hook_name).get_hookimpls():
        try:
            impl.function(**{k: v for k, v in kwargs.items() if k in impl.argnames})
        except Exception as exc:
            errors.append(f"{host.pm.get_name(impl.plugin)}: {type(exc).__name__}: {exc}")
            print(
                f"warning: plugin {host.pm.get_name(impl.plugin)} failed in {hook_name}: {exc}",
                file=sys.stderr,
            )
    return errors
