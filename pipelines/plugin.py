"""Pipeline plugin: adds ``xai pipeline`` (init, add, run, status) through the public hook.

Loaded through this distribution's own ``[project.entry-points.xai] pipelines = "pipelines.plugin"``,
exactly as a third-party plugin would be.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from xai_plugins import hookimpl

WORKSPACE = click.option(
    "--workspace",
    "-w",
    default=".",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Pipeline workspace (a folder at or above it holding dvc.yaml + params.yaml).",
)


@click.group("pipeline")
def pipeline() -> None:
    """The DVC pipeline: resolve -> explain -> evaluate -> report -> gate, per model version.

    \b
      xai pipeline init ws                        # git + dvc + dvc.yaml + params.yaml
      xai pipeline add shapes-cnn 1 -w ws         # list a version (models:/shapes-cnn/1)
      xai pipeline run shapes-cnn 1 -w ws         # add if needed, run its stages, print the gate
      xai pipeline run -w ws                      # dvc repro -k: every listed version
      xai pipeline status -w ws
    """


@pipeline.command("init")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing dvc.yaml / params.yaml.")
@click.option("--no-commit", is_flag=True, help="Do not make the first git commit.")
def init_cmd(directory: Path, force: bool, no_commit: bool) -> None:
    """Create a ready workspace in DIRECTORY (git init, dvc init, the templates)."""
    from pipelines.workspace import init_workspace

    done = init_workspace(directory, force=force, commit=not no_commit)
    created = ", ".join(done["created"]) or "nothing new"  # type: ignore[arg-type]
    click.echo(f"workspace {done['workspace']}: created {created}")
    if done.get("hint"):
        click.echo(f"note: {done['hint']}", err=True)
    click.echo(f"next: xai pipeline run NAME VERSION --uri MODEL -w {directory}")


@pipeline.command("add")
@click.argument("name")
@click.argument("version")
@click.option("--uri", help="Model URI or file (default: models:/NAME/VERSION).")
@WORKSPACE
def add_cmd(name: str, version: str, uri: str | None, workspace: Path) -> None:
    """List model version NAME VERSION in params.yaml (nothing runs)."""
    from pipelines.params import add_version
    from pipelines.workspace import find_workspace

    ws = find_workspace(workspace)
    click.echo(f"added {add_version(ws, name, version, uri)} to {ws / 'params.yaml'}")


@pipeline.command("run")
@click.argument("name", required=False)
@click.argument("version", required=False)
@click.option("--uri", help="Model URI or file (default: models:/NAME/VERSION).")
@click.option("--device", help="cpu, cuda, cuda:1 ... (XAI_DEVICE; not a tracked parameter).")
@click.option("--force", is_flag=True, help="Rerun the version's stages even when up to date.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@WORKSPACE
def run_cmd(name, version, uri, device, force, as_json, workspace) -> None:
    """Run one version's stages (NAME VERSION), or every listed version (no arguments).

    Exit status: 0 when the gate passed, 1 when it failed or a stage failed.
    """
    from pipelines.api import run_all, run_version
    from pipelines.workspace import find_workspace

    ws = find_workspace(workspace)
    env = {"XAI_DEVICE": device} if device else None
    if name is None:
        code, output = run_all(ws, env)
        click.echo(output.rstrip())
        sys.exit(code)
    if version is None:
        raise click.UsageError("give NAME and VERSION, or neither")
    result = run_version(ws, name, version, uri, env, force=force)
    verdict = result["gate"] or {}
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))
    else:
        ran = ", ".join(result["stages_run"]) or "nothing (up to date)"
        click.echo(f"ran: {ran}\nreport: {result['report']}\nresults: {result['results']}")
        try:
            from core.policy import format_table

            click.echo(format_table(verdict))
        except ImportError:  # pragma: no cover - the policy module ships with core
            pass
        click.echo(f"gate: {verdict.get('status', 'unknown')}")
    sys.exit(0 if verdict.get("passed") else 1)


@pipeline.command("status")
@click.option("--json", "as_json", is_flag=True)
@WORKSPACE
def status_cmd(as_json: bool, workspace: Path) -> None:
    """Every listed version: gate status and whether its stages are up to date."""
    from pipelines.api import status
    from pipelines.workspace import find_workspace

    rows = status(find_workspace(workspace))
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no versions listed in params.yaml")
        return
    header = ["key", "uri", "gate", "up to date"]
    table = [[r["key"], r["uri"], r["gate"] or "not run", "yes" if r["up_to_date"] else "no"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *table)]
    for row in [header, *table]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


@hookimpl
def xai_register_commands(cli):
    cli.add_command(pipeline)
