"""The Ray backend against the local backend: the same DVC pipeline, the same versions.

    python -m bench.ray_scale                      # 8 versions; local, Ray with 1 and 2 actors
    python -m bench.ray_scale --versions 4 --json bench/results/ray.json

Each configuration gets a fresh workspace and runs ``pipelines.api.run_version`` for every version
(one after the other, as the worker does: DVC allows one ``dvc repro`` per workspace), on a local
Ray cluster started here with ``--cpus`` CPUs. The model is the DeConvolve reference CNN with seeded
random weights (timing needs no training); the probe, methods and metrics are the ``--probe``
images and the default methods/metrics below. Printed: per-version latency (median) of each
configuration, versions per minute, and the ratios 2 actors / 1 actor and Ray / local.

Every configuration's stages fork from one warm stage server, as ``xai worker`` runs them
(pipelines/stage_server.py; ``--cold-stages``: a fresh interpreter per stage, as before it). Last,
the five stage functions of one version run again in this (warm) process, without DVC or any
process start-up: that is the version's compute, and each configuration's median latency minus it
is its overhead (DVC, stage start-up, Ray dispatch), printed beside it.

What this measures and what it does not: the actors save each stage's model loading and plugin
imports and spread a version's shards over CPUs or GPUs; DVC still starts each stage and hashes the
outputs, so on a machine with as many free cores as actors the 2-actor ratio approaches the share
of the version's time spent in explain/evaluate compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PARAMS: dict[str, Any] = {
    "probe": {
        "kind": "shapes",
        "n": 32,
        "size": 32,
        "seed": 1234,
        "watermark": "agree",
        "target": "predicted",
    },
    "fit_data": None,
    "batch_size": 16,
    "methods": {"saliency": {}, "grad_cam": {}, "occlusion": {"window": 4, "stride": 2}},
    "metrics": {"localization": {}, "shortcut": {}, "faithfulness": {}},
    "reporters": {"json": {}},
    "gate": {
        "checks": [
            {
                "name": "grad_cam on the object",
                "method": "grad_cam",
                "metric": "localization.relevance_mass",
                "op": ">",
                "threshold": 0.0,
            }
        ]
    },
}


def make_checkpoint(folder: Path) -> Path:
    import torch

    from core.datasets import make_shapes
    from core.models import build_model, save_checkpoint
    from core.preprocess import Preprocess
    from core.train import SHAPES_PREPROCESS

    classes = make_shapes(4, size=32, seed=0).class_names
    torch.manual_seed(0)
    model = build_model("deconvolve_cnn", len(classes))
    return save_checkpoint(
        folder / "model.pt",
        model,
        "deconvolve_cnn",
        Preprocess(size=32, **SHAPES_PREPROCESS),
        classes,
        {"bench": "ray_scale"},
    )


def run_config(
    label: str, base: Path, checkpoint: Path, versions: int, env: dict[str, str]
) -> dict[str, Any]:
    from pipelines.api import run_version
    from pipelines.params import write_params
    from pipelines.workspace import init_workspace

    ws = base / label
    init_workspace(ws, commit=False)
    write_params(ws, {**PARAMS, "versions": {}})
    latencies = []
    start = time.perf_counter()
    for v in range(1, versions + 1):
        t0 = time.perf_counter()
        result = run_version(ws, "bench-cnn", str(v), uri=str(checkpoint), env=env)
        latencies.append(time.perf_counter() - t0)
        print(
            f"  {label}: version {v} in {latencies[-1]:.1f} s, gate {result['gate'].get('status')}",
            file=sys.stderr,
            flush=True,
        )
    wall = time.perf_counter() - start
    return {
        "label": label,
        "versions": versions,
        "wall_s": wall,
        "per_minute": 60 * versions / wall,
        "latency_median_s": statistics.median(latencies),
        "latencies_s": latencies,
    }


def compute_seconds(ws: Path, rounds: int = 2) -> float:
    """The five stage functions of the workspace's first version in this process, the fastest of
    ``rounds`` (the first pays this process's imports): the version's work without start-up."""
    from pipelines.layout import STAGES
    from pipelines.params import read_params
    from pipelines.stages import main as stage_main

    key = next(iter(read_params(ws)["versions"]))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for stage in STAGES:
            if stage_main([stage, "--key", key, "--workspace", str(ws)]) != 0:
                raise SystemExit(f"stage {stage} failed in process")
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray cluster")
    parser.add_argument("--probe", type=int, default=32, help="probe images per version")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--cold-stages", action="store_true", help="no stage server: cold stage processes")
    args = parser.parse_args(argv)
    PARAMS["probe"]["n"] = args.probe
    os.environ.setdefault("XAI_NO_PROGRESS", "1")
    root = Path(__file__).resolve().parent.parent
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    from pipelines import stage_server
    from pipelines.ray_backend import start_pool, stop_pool

    warm = {} if args.cold_stages else stage_server.start().env
    rows = []
    with tempfile.TemporaryDirectory(prefix="xai-bench-ray-") as tmp:
        base = Path(tmp)
        checkpoint = make_checkpoint(base)
        print(
            f"{args.versions} versions, {args.probe} probe images, methods {list(PARAMS['methods'])}, "
            f"metrics {list(PARAMS['metrics'])}, Ray cluster of {args.cpus} CPUs",
            flush=True,
        )
        rows.append(run_config("local", base, checkpoint, args.versions, warm))
        for actors in (1, 2):
            pool = start_pool(None, actors, 0, pool=f"bench-{actors}", num_cpus=args.cpus)
            rows.append(
                run_config(f"ray-{actors}-actor", base, checkpoint, args.versions, {**pool.env, **warm})
            )
            stop_pool(pool)
        compute = compute_seconds(base / "local")
    by = {r["label"]: r for r in rows}
    print(f"stages {'cold (no stage server)' if args.cold_stages else 'forked from a warm stage server'}")
    print(f"compute of one version (its five stage functions in one warm process): {compute:.1f} s")
    for r in rows:
        r["overhead_s"] = r["latency_median_s"] - compute
        print(
            f"{r['label']:>12}: {r['per_minute']:.2f} versions/min, median latency {r['latency_median_s']:.1f} s"
            f" (compute + {r['overhead_s']:.1f} s)"
        )
    scaling = by["ray-2-actor"]["per_minute"] / by["ray-1-actor"]["per_minute"]
    latency = by["ray-2-actor"]["latency_median_s"] / by["local"]["latency_median_s"]
    print(
        f"throughput 2 actors / 1 actor: {scaling:.2f}x; latency Ray (2 warm actors) / local: {latency:.2f}x"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "throughput_ratio_2_vs_1": scaling,
                    "latency_ratio_ray_vs_local": latency,
                    "compute_s": compute,
                    "stage_server": not args.cold_stages,
                    "cpus": args.cpus,
                    "params": PARAMS,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
