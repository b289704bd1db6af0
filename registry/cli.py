"""The registry's commands: mlflow, listen, worker, sync, queue, promote, gate (added to ``xai`` through
the ``xai_register_commands`` hook). Heavy imports (mlflow, torch) happen inside the commands."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from core.redact import redact_text

WORKSPACE = click.option(
    "--workspace",
    "-w",
    type=click.Path(path_type=Path),
    default=None,
    help="Pipeline workspace (default: $XAI_WORKSPACE, else the nearest folder at or above "
    "the current one holding dvc.yaml, else the current folder).",
)


def resolve_workspace(workspace: Path | None) -> Path:
    start = Path(workspace or os.environ.get("XAI_WORKSPACE") or ".").resolve()
    try:
        from pipelines.workspace import find_workspace

        return find_workspace(start)
    except Exception:
        return start


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("urllib3", "alembic", "mlflow.store", "mlflow.tracking", "git", "dvc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from core.redact import install_log_redaction

    install_log_redaction()


def _client(ws: Path):
    from registry.models import client_for
    from registry.state import tracking_uri

    return client_for(tracking_uri(ws))


# -- mlflow --------------------------------------------------------------------------------------
@click.group("mlflow")
def mlflow_group() -> None:
    """The embedded MLflow server (sqlite + local artifacts on 127.0.0.1), kept in the workspace.

    \b
      xai mlflow start      # prints the URI; xai commands in this workspace find it by themselves
      xai mlflow status
      xai mlflow stop
    Set MLFLOW_TRACKING_URI to use any other MLflow instead.
    """


@mlflow_group.command("start")
@WORKSPACE
@click.option("--port", type=int, help="Port (default: the last one if free, else any free port).")
@click.option("--timeout", default=180.0, show_default=True, help="Seconds to wait for /health.")
def mlflow_start(workspace, port, timeout):
    """Start the server (or report the running one) and wait until it is healthy."""
    from registry import server

    info = server.start(
        resolve_workspace(workspace), port=port, timeout=timeout, log=lambda m: click.echo(m, err=True)
    )
    click.echo(f"MLflow running at {info['uri']} (PID {info['pid']})")
    click.echo(f"  UI: {info['uri']}    to use it elsewhere: export MLFLOW_TRACKING_URI={info['uri']}")


@mlflow_group.command("stop")
@WORKSPACE
def mlflow_stop(workspace):
    """Stop the server started in this workspace (by its recorded PID)."""
    from registry import server

    click.echo("MLflow stopped" if server.stop(resolve_workspace(workspace)) else "MLflow was not running")


@mlflow_group.command("status")
@WORKSPACE
@click.option("--json", "as_json", is_flag=True)
def mlflow_status(workspace, as_json):
    """Whether the workspace's server is running and healthy (exit 1 when not)."""
    from registry import server

    info = server.status(resolve_workspace(workspace))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif info.get("running"):
        click.echo(
            f"MLflow running at {info['uri']} (PID {info['pid']}, {'healthy' if info['healthy'] else 'NOT healthy'})"
        )
    else:
        click.echo("MLflow is not running" + (f" (last at {info['uri']})" if info.get("uri") else ""))
    sys.exit(0 if info.get("healthy") else 1)


# -- listen / worker / sync / queue ----------------------------------------------------------------
@click.command("listen")
@WORKSPACE
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, show_default=True, help="0 picks a free port.")
@click.option("--public-url", help="The URL MLflow must call, when not http://HOST:PORT/webhook.")
@click.option("--register-webhook", is_flag=True, help="Create/update the MLflow webhook pointing here.")
@click.option(
    "--poll-interval", default=60.0, show_default=True, help="Seconds between catch-up syncs (0: off)."
)
@click.option(
    "--guard-alias",
    "guarded",
    multiple=True,
    default=("champion",),
    show_default=True,
    help="Alias to guard: set on a version whose gate did not pass, it is moved back. Repeatable.",
)
@click.option("--no-guard", is_flag=True, help="Do not guard any alias.")
@click.option(
    "--max-attempts", default=5, show_default=True, help="Attempts per job before it fails for good."
)
@click.option("-v", "--verbose", is_flag=True)
def listen(
    workspace,
    host,
    port,
    public_url,
    register_webhook,
    poll_interval,
    guarded,
    no_guard,
    max_attempts,
    verbose,
):
    """Receive MLflow webhooks (signed, fresh, not replayed) and enqueue every new model version.

    The secret is $XAI_WEBHOOK_SECRET; on the embedded MLflow one is generated and kept in the
    workspace. Versions missed while the receiver was down are caught by the background poller.
    """
    from registry.listener import ListenConfig, Listener
    from registry.state import tracking_uri, webhook_secret

    setup_logging(verbose)
    ws = resolve_workspace(workspace)
    secret = webhook_secret(ws, create=not os.environ.get("MLFLOW_TRACKING_URI"))
    config = ListenConfig(
        host,
        port,
        public_url,
        register_webhook,
        poll_interval,
        () if no_guard else tuple(guarded),
        max_attempts,
    )
    listener = Listener(ws, secret, lambda: tracking_uri(ws), config)
    click.echo(f"listening on {listener.url} (workspace {ws})", err=True)
    listener.serve()


@click.command("worker")
@WORKSPACE
@click.option("--once", is_flag=True, help="Exit when no job is ready instead of waiting for more.")
@click.option("--max-jobs", type=int, help="Exit after this many jobs.")
@click.option(
    "--lease", default=120.0, show_default=True, help="Seconds a claimed job is held without a heartbeat."
)
@click.option("--poll", default=1.0, show_default=True, help="Seconds between looks at an empty queue.")
@click.option("--backoff", default=10.0, show_default=True, help="First retry delay; doubles per attempt.")
@click.option("--backoff-cap", default=900.0, show_default=True)
@click.option("--job-timeout", default=3600.0, show_default=True, help="Seconds one pipeline run may take.")
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: each stage computes in its own process. ray: explain/evaluate shard the probe "
    "set over warm Ray actors (docs/scale.md).",
)
@click.option("--ray-address", help="Ray head node (HOST:PORT, or 'auto'); default: start a local Ray.")
@click.option("--actors", default=2, show_default=True, help="Ray actors in the pool (one model each).")
@click.option("--gpus-per-actor", default=0.0, show_default=True, help="GPUs each Ray actor holds.")
@click.option(
    "--cold-stages",
    is_flag=True,
    help="Start every stage in a fresh interpreter instead of forking it from a warm stage server "
    "that has imported torch, the engine and the plugins once (pipelines/stage_server.py).",
)
@click.option("-v", "--verbose", is_flag=True)
def worker(
    workspace,
    once,
    max_jobs,
    lease,
    poll,
    backoff,
    backoff_cap,
    job_timeout,
    backend,
    ray_address,
    actors,
    gpus_per_actor,
    cold_stages,
    verbose,
):
    """Run the pipeline for queued versions, log one MLflow run each, tag the versions."""
    from registry.worker import Worker, WorkerConfig

    setup_logging(verbose)
    w = Worker(resolve_workspace(workspace), WorkerConfig(lease, poll, backoff, backoff_cap, job_timeout))
    w.acquire()
    if backend == "ray":
        from pipelines.ray_backend import start_pool

        # an unreachable cluster or missing GPUs: XAIError, one line, exit 2 (core.cli.main)
        pool = start_pool(ray_address, actors, gpus_per_actor, pool=f"xai-worker-{os.getpid()}")
        w.stage_env.update(pool.env)  # `pool` holds the actors for as long as this worker runs
        click.echo(f"worker: {actors} Ray actor(s) on {pool.env['XAI_RAY_ADDRESS']}", err=True)
    if not cold_stages:
        from pipelines import stage_server

        # it imports ahead while the worker waits for jobs, and dies with this process
        w.stage_server = stage_server.start(w.stage_env, wait=False)
    click.echo(f"worker {w.name} on {w.workspace}", err=True)
    try:
        n = w.run(once=once, max_jobs=max_jobs)
    except KeyboardInterrupt:
        click.echo("worker stopped", err=True)
        return
    click.echo(f"worker processed {n} job(s)", err=True)


@click.command("sync")
@WORKSPACE
@click.option("--model", help="Only this registered model.")
@click.option(
    "--all", "all_versions", is_flag=True, help="Enqueue every version (e.g. after a config change)."
)
@click.option("--retry-failed", is_flag=True, help="Give jobs that failed for good fresh attempts.")
@click.option("--write-params", is_flag=True, help="Also list the registry's versions in params.yaml.")
def sync_cmd(workspace, model, all_versions, retry_failed, write_params):
    """Enqueue every version without an xai.status tag (what the receiver missed)."""
    from registry.poller import sync
    from registry.queue import Queue
    from registry.state import State

    ws = resolve_workspace(workspace)
    if retry_failed:
        queue = Queue(State(ws).ensure().queue_db)
        click.echo(f"requeued {queue.retry_failed(model)} failed job(s)")
        queue.close()
    result = sync(_client(ws), ws, model=model, all_versions=all_versions, write_params=write_params)
    for name, version in result.enqueued:
        click.echo(f"enqueued {name} {version}")
    for name, version, why in result.refused:
        click.echo(f"refused {name!r} {version}: {why}", err=True)
    click.echo(
        f"{result.seen} version(s) in the registry, {len(result.enqueued)} enqueued, "
        f"{len(result.already_queued)} already queued"
    )
    if write_params:
        click.echo(f"params.yaml lists {len(result.written)} version(s)")


@click.command("queue")
@WORKSPACE
@click.option("--json", "as_json", is_flag=True)
def queue_cmd(workspace, as_json):
    """The job queue: one line per job (state, attempts, last error)."""
    from registry.queue import Queue
    from registry.state import State

    queue = Queue(State(resolve_workspace(workspace)).ensure().queue_db)
    jobs = queue.jobs()
    if as_json:
        click.echo(json.dumps([j.__dict__ for j in jobs], indent=2))
        return
    for j in jobs:
        when = (
            f" next try {time.strftime('%H:%M:%S', time.localtime(j.next_run_at))}"
            if j.state == "queued"
            else ""
        )
        err = (
            f"  {redact_text(j.last_error.splitlines()[0][:100])}"
            if j.last_error and j.state != "done"
            else ""
        )
        click.echo(
            f"{j.id:>5}  {j.model} {j.version:<5} {j.state:<8} attempts {j.attempts}/{j.max_attempts}{when}{err}"
        )
    counts = queue.counts()
    click.echo(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "the queue is empty")


# -- gate / promote ------------------------------------------------------------------------------
@click.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="champion", show_default=True)
@WORKSPACE
def promote_cmd(name, version, alias, workspace):
    """Set ALIAS on NAME VERSION only if its gate passed (exit 1 with the failing checks otherwise)."""
    from registry.gate import GateRefused, promote, table, version_gate

    client = _client(resolve_workspace(workspace))
    try:
        state = promote(client, name, version, alias)
    except GateRefused:
        click.echo(table(version_gate(client, name, version)))
        raise
    click.echo(table(state))
    click.echo(f"{name} version {version} is now '{alias}'")


@click.command("gate")
@click.argument("name", required=False)
@click.argument("version", required=False)
@click.option("--results", type=click.Path(exists=True, path_type=Path), help="Local use: a results.json.")
@click.option("--policy", type=click.Path(exists=True, path_type=Path), help="Local use: a policy YAML.")
@click.option("--out", type=click.Path(path_type=Path), help="Local use: write the verdict JSON here.")
@WORKSPACE
def gate_cmd(name, version, results, policy, out, workspace):
    """The gate of NAME VERSION from the registry, or of a local results.json under a policy.

    Exit status: 0 passed, 1 failed, 2 error or not evaluated (for CI/CD).
    """
    if results or policy:
        if not (results and policy) or name:
            raise click.UsageError(
                "local use: xai gate --results results.json --policy policy.yaml [--out FILE]"
            )
        from core.policy import gate_main

        sys.exit(gate_main(str(results), str(policy), str(out) if out else None))
    if not (name and version):
        raise click.UsageError("give NAME VERSION, or --results and --policy")
    from registry.gate import table, version_gate

    state = version_gate(_client(resolve_workspace(workspace)), name, version)
    click.echo(table(state))
    sys.exit(state.exit_code)


COMMANDS = (mlflow_group, listen, worker, sync_cmd, queue_cmd, promote_cmd, gate_cmd)


def all_commands() -> tuple:
    """The commands above and the explorer's ``xai ui``."""
    from registry.ui.cli import ui_cmd

    return (*COMMANDS, ui_cmd)
