"""Hook specifications of the xai plugin host (pluggy project "xai").

Registration hooks return lists of classes, each with a unique ``name``; the host calls every
implementation separately so that a duplicate name can be reported with both plugins named and a
plugin whose registration raises is isolated. Broadcast hooks announce lifecycle events to every
plugin (reporters, notifiers).
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("xai")
hookimpl = pluggy.HookimplMarker("xai")


def provides(*names: str) -> Any:
    """Declare the names a registration hook returns (``"captum_*"``: any name with that prefix),
    so the host calls it only when one of them is asked for (or every name is listed). For hooks
    whose registration is costly, such as a bridge importing its library; a name outside the
    declaration is a load error of the plugin. Put it under ``@hookimpl``."""

    def mark(function: Any) -> Any:
        function.xai_provides = tuple(names)
        return function

    return mark


@hookspec
def xai_explainers() -> list[type]:
    """Return the Explainer subclasses this plugin provides."""
    return []


@hookspec
def xai_metrics() -> list[type]:
    """Return the Metric subclasses this plugin provides."""
    return []


@hookspec
def xai_reporters() -> list[type]:
    """Return the Reporter subclasses this plugin provides."""
    return []


@hookspec
def xai_describers() -> list[type]:
    """Return the Describer subclasses (text backends for DeConvolve) this plugin provides."""
    return []


@hookspec
def xai_register_commands(cli: Any) -> None:
    """Add click commands or groups to the ``xai`` command line (``cli.add_command``)."""


@hookspec
def xai_report_ready(results: Any, out_dir: Any) -> None:
    """Broadcast: a run's results and reports were written to ``out_dir``."""


@hookspec
def xai_gate_decided(verdict: dict) -> None:
    """Broadcast: a gate verdict (``{"passed": bool, "checks": [...], ...}``) was decided."""


@hookspec(firstresult=True)
def xai_load_model(uri: str, unsafe: bool) -> Any:
    """Load a model from a URI this plugin understands (e.g. ``models:/name/version``) and return
    a ``core.models.LoadedModel``; return None to let other plugins (or the file loader) try."""
