"""Registry plugin: the MLflow commands and the ``models:/`` model loader, added to ``xai`` through
the public hooks (this distribution's ``[project.entry-points.xai] registry``, as a third party would).
"""

from __future__ import annotations

from xai_plugins import hookimpl


@hookimpl
def xai_register_commands(cli):
    from registry.cli import all_commands

    for command in all_commands():
        cli.add_command(command)


@hookimpl
def xai_load_model(uri: str, unsafe: bool):
    """``models:/name/version`` and ``models:/name@alias`` from the MLflow registry
    ($MLFLOW_TRACKING_URI, else the workspace's embedded server); None for other URIs."""
    if not uri.startswith("models:/"):
        return None
    from registry.models import load_version
    from registry.state import tracking_uri

    return load_version(uri, unsafe=unsafe, tracking_uri=tracking_uri())
