"""``xai ui``: start the explorer on 127.0.0.1 against the configured MLflow."""

from __future__ import annotations

import threading
import time
from typing import Any

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


def start_in_thread(
    uri: str, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0
) -> tuple[Any, str]:
    """The explorer over ``uri`` served by uvicorn in a daemon thread of this process (``make demo``,
    the bench): (the uvicorn server, set ``should_exit`` to stop it; the address with its token)."""
    import uvicorn

    from registry import server
    from registry.ui.app import create_app
    from registry.ui.security import new_token

    token, port = new_token(), port or server.free_port(host)
    srv = uvicorn.Server(uvicorn.Config(create_app(uri, token), host=host, port=port, log_level="warning"))
    threading.Thread(target=srv.run, name="xai-ui", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the explorer did not start within {timeout:.0f} s")
        time.sleep(0.1)
    return srv, f"http://{host}:{port}/?token={token}"
