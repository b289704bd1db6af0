"""``python -m bench.stage_startup [--against REV] [--repeat N]``: wall seconds of each DVC stage
process of one version (resolve, explain, evaluate, report, gate) on a tiny workspace (one untrained
DeConvolve CNN, 8 `shapes` images of 32 px, saliency + grad_cam, the localization metric, json + html
reporters), where the work is a few milliseconds and the rest is the process's start-up: the
interpreter, its imports and the plugin host. ``--against REV`` runs the same stages with the
sources of git revision REV too (``git archive`` into a temporary folder, first on PYTHONPATH), for
a before/after table; ``--warm`` adds a column with every stage sent to a warm stage server
(pipelines/stage_server.py, what ``xai worker`` starts: the imports are paid once per worker, not
once per stage; the server's own start-up is printed apart). Each figure is the fastest of
``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipelines.layout import STAGES

ROOT = Path(__file__).resolve().parent.parent
KEY = "cnn-v1"
# the tiny workspace's one gate check (also tests/test_pipeline.py's): pointing game >= 0 for saliency
GATE = {
    "checks": [
        {
            "name": "saliency-pointing",
            "method": "saliency",
            "metric": "localization.pointing_game",
            "op": ">=",
            "threshold": 0.0,
        }
    ]
}


def make_workspace(folder: Path) -> str:
    """params.yaml (the template, 8 probe images, localization, one gate check) and one version's
    checkpoint in ``folder``; returns the version's key. No git or DVC: stages run without them."""
    from core.datasets import CLASS_NAMES
    from core.models import build_model, save_checkpoint
    from core.preprocess import Preprocess
    from pipelines.params import write_versions
    from pipelines.workspace import TEMPLATES

    folder.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((TEMPLATES / "params.yaml").read_text())
    params["probe"].update(n=8)
    params.update(metrics={"localization": {}}, gate=GATE)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    torch.manual_seed(1)
    model = save_checkpoint(
        folder / "cnn.pt",
        build_model("deconvolve_cnn", 4),
        "deconvolve_cnn",
        Preprocess(size=32, mean=[0.5] * 3, std=[0.25] * 3),
        CLASS_NAMES,
        {"seed": 1},
    )
    write_versions(folder, [{"name": "cnn", "version": 1, "uri": str(model)}])
    return KEY


def run_stage(
    workspace: Path, stage: str, source: Path = ROOT, key: str = KEY, server: dict[str, str] | None = None
) -> float:
    """Seconds of ``python -m pipelines.stages STAGE`` with the sources in ``source`` (sent to the
    stage server whose environment is ``server``, if given); fails loudly."""
    env = {**os.environ, "PYTHONPATH": str(source), "XAI_NO_PROGRESS": "1", "XAI_DEVICE": "cpu"}
    env.pop("XAI_STAGE_SERVER", None)
    env.update(server or {})
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.stages", stage, "--key", key],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0 or (server and "note: stage server" in proc.stderr):
        raise SystemExit(f"stage {stage} with {source} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds


def stage_seconds(
    workspace: Path, source: Path = ROOT, repeat: int = 1, server: dict[str, str] | None = None
) -> dict[str, float]:
    """The fastest of ``repeat`` runs of each stage, in pipeline order (each needs the one before)."""
    best = {stage: float("inf") for stage in STAGES}
    for _ in range(repeat):
        for stage in STAGES:
            best[stage] = min(best[stage], run_stage(workspace, stage, source, server=server))
    return best


def export_revision(rev: str, folder: Path) -> Path:
    """The tracked files of git revision ``rev`` in ``folder``."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.stage_startup", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--against", metavar="REV", help="also time the stages of this git revision (before)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per stage; the fastest counts (default 1)"
    )
    parser.add_argument("--warm", action="store_true", help="also time the stages on a warm stage server")
    args = parser.parse_args(argv)
    server_start = None
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Path(tmp) / "ws"
        make_workspace(workspace)
        columns = {}
        if args.against:
            columns[f"before ({args.against})"] = stage_seconds(
                workspace, export_revision(args.against, Path(tmp)), args.repeat
            )
        columns["after" if args.against else "seconds"] = stage_seconds(workspace, ROOT, args.repeat)
        if args.warm:
            from pipelines import stage_server

            start = time.perf_counter()
            with stage_server.start() as server:
                server_start = time.perf_counter() - start
                columns["warm server"] = stage_seconds(workspace, ROOT, args.repeat, server.env)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    torch_floor = time.perf_counter() - start
    header = ["stage", *columns]
    print("  ".join(f"{h:>18}" for h in header))
    for stage in [*STAGES, "total"]:
        cells = [sum(c.values()) if stage == "total" else c[stage] for c in columns.values()]
        print("  ".join([f"{stage:>18}", *(f"{v:18.2f}" for v in cells)]))
    print(f"(a bare `python -c 'import torch'` takes {torch_floor:.2f} s here)")
    if server_start is not None:
        print(f"(the stage server took {server_start:.2f} s to start, once per worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
