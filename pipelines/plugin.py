"""Pipeline plugin: adds the DVC pipeline commands to `xai` through the public hook (entry point)."""

from xai_plugins import hookimpl


@hookimpl
def xai_register_commands(cli):
    return None
