"""``xai ui``: start the explorer on 127.0.0.1 against the configured MLflow."""

from __future__ import annotations

import click

from registry.cli import WORKSPACE, resolve_workspace


@click.command("ui")
@WORKSPACE
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (keep it local).")
@click.option("--port", type=int, default=0, help="Port (default: any free port).")
def ui_cmd(workspace, host, port):
    """The web explorer: registry, version, compare, DeConvolve and PV pages, explain on demand.

    Reads $MLFLOW_TRACKING_URI, else the workspace's embedded MLflow. Prints an address with a random
    token; every request needs it (kept in an HttpOnly cookie after the first page)."""
    import uvicorn

    from registry import server
    from registry.state import tracking_uri
    from registry.ui.app import create_app
    from registry.ui.security import new_token

    ws = resolve_workspace(workspace)
    uri = tracking_uri(ws)
    token = new_token()
    port = port or server.free_port(host)
    click.echo(f"xai explorer at http://{host}:{port}/?token={token}  (MLflow {uri})", err=False)
    uvicorn.run(create_app(uri, token), host=host, port=port, log_level="warning")
