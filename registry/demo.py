"""``python -m registry.demo`` (what ``make demo`` runs): the whole loop on the embedded default.

Creates a pipeline workspace, starts MLflow, the webhook listener and the worker, trains the clean
reference CNN and the Clever Hans one, registers both as versions of one model, and watches them be
explained, checked and logged through the webhook. Then it prints the gate table of each version,
promotes the clean one to ``champion`` and shows that the Clever Hans one is refused. MLflow and the
explorer (``xai ui``) keep running (both addresses printed) until Ctrl-C; ``--no-wait`` stops
everything (printing the ``xai ui`` command instead) and exits 0 only when the story came out as expected.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

MODEL_NAME = "shapes-cnn"
# The demo's gate (written over the template's): first the template's sanity checks (policies/
# default.yaml: cascading, independent and label randomization, Adebayo et al.) for the three methods
# the gate reads (guided backprop, also in the report, is known to fail cascading randomization; it
# is not gated), flagged `sanity` so a method failing one cannot carry its other checks; then relevance must
# fall on the object, not on the planted watermark. Measured on the demo's 32 'agree' probe images
# (2026-12-03, training seeds 0-4 and the demo's own models): on the object, saliency 0.22-0.27 (clean)
# against 0.11-0.13 (Clever Hans), so its bar is 0.17, halfway (0.25 refused the clean CNN of seeds
# 1 and 3); Grad-CAM 0.38-0.46 against 0.13-0.14, bar 0.25. On the watermark, over training seeds
# 0-9, LRP puts 0.07-0.11 (clean) and 0.31-0.42 (Clever Hans), so the shortcut check reads LRP
# (Grad-CAM's coarse map gives 0.05-0.17 and 0.20-0.22: no threshold separates every seed). The template's AOPC check is
# still computed and shown in the report.
GATED = ["saliency", "grad_cam", "lrp"]
DEMO_GATE = {
    "name": "demo: sanity checks and Clever Hans detection",
    "checks": [
        {
            "name": "sensitive to cascading randomization",
            "method": GATED,
            "metric": "sanity.cascading.spearman_full",
            "op": "<",
            "threshold": 0.7,
            "sanity": True,
        },
        {
            "name": "sensitive to each layer",
            "method": GATED,
            "metric": "sanity.independent.ssim_max",
            "op": "<",
            "threshold": 0.9,
            "sanity": True,
        },
        {
            "name": "sensitive to the labels learnt",
            "method": GATED,
            "metric": "sanity.label.spearman",
            "op": "<",
            "threshold": 0.85,
            "sanity": True,
        },
        {
            "name": "lrp not looking at the shortcut",
            "method": "lrp",
            "metric": "shortcut.share",
            "op": "<",
            "threshold": 0.2,
        },
        {
            "name": "saliency looks at the object",
            "method": "saliency",
            "metric": "localization.relevance_mass",
            "op": ">",
            "threshold": 0.17,
        },
        {
            "name": "grad_cam looks at the object",
            "method": "grad_cam",
            "metric": "localization.relevance_mass",
            "op": ">",
            "threshold": 0.25,
        },
    ],
}
# The methods compared side by side in the report (the gate reads saliency and grad_cam). All cheap on
# the 32 px CNN; occlusion or RISE would multiply the explain and sanity costs by their forward passes.
DEMO_METHODS = {
    "saliency": {},
    "guided_backprop": {},
    "integrated_gradients": {"steps": 16},
    "lrp": {},
    "grad_cam": {},
}
T0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", flush=True)


def prepare_workspace(ws: Path) -> None:
    from pipelines.workspace import init_workspace

    init_workspace(ws)
    params_file = ws / "params.yaml"
    params = yaml.safe_load(params_file.read_text()) or {}
    metrics = params.get("metrics") or {}
    if isinstance(metrics, list):
        metrics = {m: {} for m in metrics}
    wanted = {"localization": {}, "shortcut": {}, **metrics}  # what the demo's gate reads
    if params.get("gate") != DEMO_GATE or wanted != metrics or params.get("methods") != DEMO_METHODS:
        from pipelines.params import write_params

        params["metrics"], params["gate"], params["methods"] = wanted, DEMO_GATE, DEMO_METHODS
        write_params(ws, params)


def busy() -> bool:
    """More runnable processes than cores: one torch thread per process then beats two (OpenMP
    threads waiting on each other for a share of a core: 2.4x faster training on a loaded 2-core box)."""
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def start_process(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "core.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name} ended early:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {text!r} in {log}")


def train(ws: Path, watermark: str) -> Path:
    from core.train import train_reference

    path = ws / "models" / f"deconvolve_cnn-{watermark}.pt"
    if path.is_file():
        say(f"reusing {path.relative_to(ws)}")
        return path
    label = "clean" if watermark == "none" else "Clever Hans (watermark = label)"
    say(f"training the {label} reference CNN on `shapes` ...")
    if busy():
        import torch

        torch.set_num_threads(1)
    result = train_reference("deconvolve_cnn", path, watermark=watermark, progress=sys.stderr.isatty())
    say(f"  held-out accuracy {result.accuracy:.1%} -> {path.relative_to(ws)}")
    return path


def watch(client: Any, versions: dict[str, str], timeout: float) -> dict[str, dict[str, str]]:
    """Print each version's xai.status changes until all are done (or failed for good)."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tags = {v: dict(client.get_model_version(MODEL_NAME, v).tags or {}) for v in versions.values()}
        for label, v in versions.items():
            status = tags[v].get("xai.status", "queued")
            detail = (
                f" (gate {tags[v].get('xai.gate')})"
                if status == "done"
                else f": {tags[v].get('xai.error', '')[:160]}"
                if status == "failed"
                else ""
            )
            if seen.get(v) != status + detail:
                seen[v] = status + detail
                say(f"  {MODEL_NAME} v{v} [{label}]: {status}{detail}")
        finished = [
            t.get("xai.status") == "done" or (t.get("xai.status") == "failed" and t.get("xai.retry") == "no")
            for t in tags.values()
        ]
        if all(finished):
            return tags
        time.sleep(2.0)
    raise RuntimeError(f"versions not processed within {timeout:.0f}s; see the worker log")


def story(client: Any, versions: dict[str, str]) -> bool:
    """Gate tables, then promotion: the clean version becomes champion, Clever Hans is refused."""
    from registry.gate import GateRefused, promote, table, version_gate

    for label, v in versions.items():
        print(f"\n=== {label.replace('_', ' ')} ===\n{table(version_gate(client, MODEL_NAME, v))}")
    print()
    ok = True
    try:
        promote(client, MODEL_NAME, versions["clean"], "champion")
        say(f"promoted {MODEL_NAME} v{versions['clean']} (clean) to 'champion'")
    except GateRefused as exc:
        say(f"unexpected: the clean version was refused:\n{exc}")
        ok = False
    try:
        promote(client, MODEL_NAME, versions["clever_hans"], "champion")
        say("unexpected: the Clever Hans version was promoted")
        ok = False
    except GateRefused as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        say(
            f"xai promote refused the Clever Hans version, as it should: {first} (failed checks in its table above)"
        )
    champion = (client.get_registered_model(MODEL_NAME).aliases or {}).get("champion")
    say(f"{MODEL_NAME}@champion is version {champion}" if champion else f"{MODEL_NAME} has no champion")
    return ok and str(champion) == versions["clean"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m registry.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path("demo-workspace"))
    parser.add_argument("--no-wait", action="store_true", help="Stop everything and exit at the end.")
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds to wait for the pipeline runs.")
    args = parser.parse_args(argv)
    ws = args.workspace.resolve()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if busy():
        env.setdefault("OMP_NUM_THREADS", "1")  # the worker's pipeline stages
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("XAI_NO_PROGRESS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # mlflow resets its logger's level on import
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" per upload
    procs: list[subprocess.Popen] = []
    from registry import server
    from registry.models import client_for, register_checkpoint
    from registry.state import State

    try:
        say(f"workspace {ws} (git + DVC pipeline)")
        prepare_workspace(ws)
        started: dict[str, Any] = {}
        boot = threading.Thread(target=lambda: started.update(server.start(ws)), daemon=True)
        boot.start()
        say("starting MLflow (sqlite + local artifacts) in the background")
        models = {"clean": train(ws, "none"), "clever_hans": train(ws, "shortcut")}
        boot.join()
        if not started:
            raise RuntimeError("MLflow did not start; see .xai/registry/mlflow/server.log")
        uri = started["uri"]
        say(f"MLflow at {uri}")
        logs = State(ws).root / "logs"
        procs.append(
            start_process(
                ["listen", "-w", str(ws), "--register-webhook", "--poll-interval", "30"],
                logs / "listener.log",
                env,
            )
        )
        procs.append(start_process(["worker", "-w", str(ws)], logs / "worker.log", env))
        wait_for_line(logs / "listener.log", "MLflow webhook", procs[0], 300)
        say(f"listener + worker running (logs in {logs})")
        client = client_for(uri)
        versions = {}
        for label, path in models.items():
            mv = register_checkpoint(client, MODEL_NAME, path, description=f"reference CNN ({label})")
            versions[label] = str(mv.version)
            say(f"registered {MODEL_NAME} v{mv.version} ({label}); the webhook takes it from here")
        watch(client, versions, args.timeout)
        ok = story(client, versions)
        print(f"\nMLflow UI: {uri}   (model '{MODEL_NAME}', experiment 'xai-explanations')")
        for label, v in versions.items():
            run_id = client.get_model_version(MODEL_NAME, v).tags.get("xai.run_id")
            print(
                f"  v{v} {label}: {uri}/#/experiments/{client.get_run(run_id).info.experiment_id}/runs/{run_id}"
            )
        if args.no_wait:
            print(f"xai explorer: `xai ui -w {ws}` (while MLflow runs: without --no-wait)")
            return 0 if ok else 1
        from registry.ui.cli import start_in_thread

        _, address = start_in_thread(uri)
        compare = f"/m/{MODEL_NAME}/compare?a={versions['clean']}&b={versions['clever_hans']}&token="
        print(f"xai explorer: {address}\n  compare the two versions: {address.replace('/?token=', compare)}")
        print("MLflow and the explorer keep running; press Ctrl-C to stop them.", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
        return 0
    except Exception as exc:
        say(f"demo failed: {exc}")
        return 1
    finally:
        for proc in procs:
            stop_process(proc)
        server.stop(ws)


if __name__ == "__main__":
    sys.exit(main())
