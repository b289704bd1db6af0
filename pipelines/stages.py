"""The DVC stage entry points: ``python -m pipelines.stages STAGE --key KEY [--device D]``.

One stage group per model version (``foreach`` over ``versions`` in params.yaml), each stage in its
own process, run from the workspace root:

    resolve   load the version (file path, or models:/ through the registry plugin), record its
              fingerprint, preprocessing and classes, copy the weights into the stage output
    explain   every method in ``methods`` on the probe set (GPU when present)
    evaluate  every metric in ``metrics`` (sanity checks re-run the same explainer); metrics.json
              (headline scalars) and plots/*.csv (curves) for ``dvc metrics`` / ``dvc plots``
    report    every reporter in ``reporters`` (json, html, mlflow, ...); a reporter that fails
              fails the stage, after the others have written their files
    gate      the ``gate`` policy (core.policy) on results.json: verdict.json and gate.json (a DVC
              metric); a failed gate is a result, not a stage error; broadcasts xai_gate_decided

Plugin failures inside explain/evaluate are recorded (and fail the gate closed), not stage errors;
a stage error (a model that cannot load, a bad parameter) exits 1 with one line naming the stage.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import XAIError
from core.redact import redact_text
from pipelines import layout, ray_backend, stage_server
from pipelines.params import read_params, version_entry

if TYPE_CHECKING:  # torch and the result types load in the stage functions: the stage server's
    import torch  # client (``python -m pipelines.stages`` with XAI_STAGE_SERVER) imports neither

    from core.types import RunResults

HEADLINE_SKIP = ("random_pointing", "mask_fraction", "seconds")  # baselines and timings
NOT_CURVES = ("fractions", "layers")  # axes, not results


class StageContext:
    """params.yaml, the version's entry and its output folder, for stage ``stage`` of ``key``."""

    def __init__(self, stage: str, key: str, workspace: Path, device: str | None = None):
        self.stage, self.key, self.workspace, self.device_arg = stage, key, workspace, device
        self.params = read_params(workspace)
        self.entry = version_entry(self.params, key)
        self.out = layout.version_dir(workspace, self.entry)

    def section(self, name: str, default: Any = None) -> Any:
        value = self.params.get(name)
        return default if value is None else value

    @property
    def batch_size(self) -> int:
        return int(self.section("batch_size", 32))

    @property
    def timeout(self) -> float | None:
        """Seconds one plugin call may take: ``XAI_TIMEOUT``, else params.yaml ``timeout``, else the
        engine's default (core.isolation.DEFAULT_TIMEOUT); 0 or "none": no limit."""
        from core.isolation import DEFAULT_TIMEOUT

        env = os.environ.get("XAI_TIMEOUT", "").strip()
        value = env or self.params.get("timeout")
        return plugin_timeout(
            DEFAULT_TIMEOUT if value is None else value, "XAI_TIMEOUT" if env else "params.yaml timeout"
        )

    def model(self):
        from pipelines.resolved import load_resolved

        return load_resolved(self.out)

    def probe(self, loaded):
        from pipelines.probe import load_probe, preprocess_for

        spec = self.section("probe", {})
        pre = preprocess_for(spec, loaded.preprocess)
        return load_probe(spec, pre, loaded.class_names, self.workspace), pre

    def engine(self, device: torch.device, fit_data: Any = None):
        from core.engine import Engine

        return Engine(
            device=device, batch_size=self.batch_size, timeout=self.timeout, progress=False, fit_data=fit_data
        )

    def device(self) -> torch.device:
        from pipelines.device import pick_device

        return pick_device(self.key, self.device_arg)


def plugin_timeout(value: Any, source: str) -> float | None:
    """A time limit in seconds from a parameter or the environment; 0 or "none": None (no limit)."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", "off"):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise XAIError(f"{source} must be a number of seconds (0 or none: no limit), got {value!r}") from None
    if seconds != seconds or seconds < 0:
        raise XAIError(f"{source} must be a number of seconds (0 or none: no limit), got {value!r}")
    return seconds or None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=False))
    tmp.replace(path)


# -- resolve -------------------------------------------------------------------------------------
def resolve(ctx: StageContext) -> None:
    from core.cli import load_any_model
    from pipelines.resolved import save_resolved

    loaded = load_any_model(ctx.entry["uri"])
    info = save_resolved(loaded, ctx.out, dict(ctx.entry))
    print(
        f"resolved {ctx.entry['name']} {ctx.entry['version']} ({ctx.entry['uri']}): {info['arch']}, "
        f"fingerprint {info['fingerprint'][:12]}"
    )


# -- explain -------------------------------------------------------------------------------------
def explain(ctx: StageContext) -> None:
    from core.engine import parse_requests
    from core.workflow import nonfinite_outputs
    from pipelines import store
    from pipelines.probe import load_fit_data

    loaded, _ = ctx.model()
    probe, pre = ctx.probe(loaded)
    requests = parse_requests(ctx.section("methods", {}))
    if not requests:
        raise XAIError("params.yaml lists no methods")
    fit_data = load_fit_data(ctx.params.get("fit_data"), pre)
    if ray_backend.enabled():  # the same engine run, sharded over the worker's warm actors
        device = "the Ray cluster"
        out, fit_info = ray_backend.explain(
            ctx.out, probe.inputs, probe.targets, requests, ctx.batch_size, ctx.timeout, fit_data
        )
    else:
        device = ctx.device()
        engine = ctx.engine(device, fit_data)
        out = engine.run(loaded.model.to(device), probe.inputs, requests, targets=probe.targets, isolate=True)
        fit_info = engine.fit_info
    failures = out.failures + nonfinite_outputs(out.logits)
    store.save_explanations(
        ctx.out / layout.EXPLANATIONS, out.explanations, out.targets, out.logits, failures, fit_info
    )
    for f in failures:
        print(f"warning: {f.name} failed ({f.kind}): {f.message}", file=sys.stderr)
    print(
        f"explained {len(probe.names)} images with {len(out.explanations)}/{len(requests)} methods on {device}"
    )


def base_results(ctx: StageContext, loaded, info: dict[str, Any]) -> tuple[RunResults, Any]:
    """RunResults rebuilt from the probe and explanations.pt (no metrics yet), and the preprocessing."""
    import torch

    from core.engine import parse_requests
    from core.types import RunResults
    from pipelines import store

    probe, pre = ctx.probe(loaded)
    saved = store.load_explanations(ctx.out / layout.EXPLANATIONS)
    logits = saved["logits"]
    results = RunResults(
        inputs=probe.inputs,
        images=probe.images,
        targets=saved["targets"],
        predictions=logits.argmax(1),
        probabilities=torch.softmax(logits, dim=1),
        labels=probe.labels,
        image_names=probe.names,
        class_names=loaded.class_names,
        masks=probe.masks,
        spurious_masks=probe.spurious,
        explanations=saved["explanations"],
        failures=list(saved["failures"]),
        skipped_inputs=list(probe.skipped),
        timings={label: e.seconds for label, e in saved["explanations"].items()},
        meta={
            "model": {**ctx.entry, "fingerprint": info["fingerprint"], "arch": info["arch"]},
            "probe": ctx.section("probe", {}),
            "pipeline": {"key": ctx.key},
            "methods_requested": [r.label for r in parse_requests(ctx.section("methods", {}))],
        },
    )
    if saved["fitted"]:
        results.meta["fitted"] = saved["fitted"]
    return results, pre


# -- evaluate ------------------------------------------------------------------------------------
def _metric_config(ctx: StageContext) -> dict[str, dict]:
    metrics = ctx.section("metrics", {})
    if isinstance(metrics, list):
        return {m: {} for m in metrics}
    return {name: dict(p or {}) for name, p in metrics.items()}


def headline(results: RunResults) -> dict[str, Any]:
    """metrics.json: finite scalars per method and for the model, the failure count, accuracy."""
    from pipelines import store

    out: dict[str, Any] = {}
    for label, values in results.metrics.items():
        row = {k: store.scalar(v) for k, v in values.items() if not k.endswith(HEADLINE_SKIP)}
        out[label] = {k: v for k, v in row.items() if v is not None}
    model = {k: store.scalar(v) for k, v in results.global_metrics.items()}
    model = {k: v for k, v in model.items() if v is not None}
    if results.labels is not None and len(results.labels):
        model["probe_accuracy"] = float((results.labels == results.predictions).float().mean())
    out["model"] = model
    out["failures"] = len(results.failures)
    return out


def path_segment(name: str) -> str:
    """One file or folder name from a plugin-given name (a metric key, a method label): every
    character outside ``A-Z a-z 0-9 . _ -`` becomes ``_`` and dots cannot lead, so ``../x`` or
    ``a/b`` never leave the folder they are written in."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", str(name)).lstrip(".") or "_"


def write_plots(results: RunResults, folder: Path) -> list[Path]:
    """Every curve-valued metric as ``<metric>/<method>.csv`` (step, value); always confidence.csv.
    Names come from plugins, so each becomes a :func:`path_segment` inside ``folder``."""
    from pipelines import store

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for label, values in [*results.metrics.items(), ("model", results.global_metrics)]:
        for key, value in values.items():
            points = None if key.endswith(NOT_CURVES) else store.curve(value)
            if points is None:
                continue
            path = folder / path_segment(key) / f"{path_segment(label)}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["step", key])
                w.writerows([i, v] for i, v in enumerate(points))
            written.append(path)
    conf = results.probabilities.max(1).values.tolist()
    with (folder / "confidence.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "image", "confidence"])
        w.writerows(
            [i, name, round(float(c), 6)] for i, (name, c) in enumerate(zip(results.image_names, conf))
        )
    return written


def evaluate(ctx: StageContext) -> None:
    import torch

    from core.engine import parse_requests
    from core.plugins import get_host
    from core.workflow import compute_metrics, validate_names
    from pipelines import store
    from pipelines.probe import load_fit_data

    loaded, info = ctx.model()
    results, pre = base_results(ctx, loaded, info)
    config = _metric_config(ctx)
    validate_names([], list(config), [])
    requests = parse_requests(ctx.section("methods", {}))
    fit_data = load_fit_data(ctx.params.get("fit_data"), pre)
    n_before = len(results.failures)
    data = (
        (fit_data.inputs, fit_data.labels) if fit_data is not None and fit_data.labels is not None else None
    )
    if ray_backend.enabled():  # one (metric, method) pair per call on the worker's warm actors
        device = "the Ray cluster"
        per_method = {name: get_host().get("metric", name).per_method for name in config}
        ray_backend.evaluate(
            ctx.out,
            results,
            list(config),
            per_method,
            requests,
            config,
            ctx.batch_size,
            ctx.timeout,
            fit_data,
            data,
        )
    else:
        device = ctx.device()
        engine = ctx.engine(device, fit_data)
        with torch.enable_grad():
            compute_metrics(
                results, loaded.model.to(device), engine, list(config), requests, get_host(), config, data
            )
    store.save_evaluation(
        ctx.out / layout.EVALUATION,
        results.metrics,
        results.global_metrics,
        results.figures,
        results.failures[n_before:],
        results.timings,
        {"skipped_metrics": results.meta.get("skipped_metrics", {})},
    )
    _write_json(ctx.out / layout.METRICS, headline(results))
    write_plots(results, ctx.out / layout.PLOTS)
    for f in results.failures[n_before:]:
        print(f"warning: {f.name} failed ({f.kind}): {f.message}", file=sys.stderr)
    print(f"evaluated {len(config)} metrics on {len(results.explanations)} methods on {device}")


# -- report --------------------------------------------------------------------------------------
def report(ctx: StageContext) -> None:
    from core.plugins import get_host
    from core.workflow import write_reports
    from pipelines import store

    loaded, info = ctx.model()
    results, _ = base_results(ctx, loaded, info)
    evaluation = store.load_evaluation(ctx.out / layout.EVALUATION)
    results.metrics, results.global_metrics = evaluation["metrics"], evaluation["global_metrics"]
    results.figures = dict(evaluation["figures"])
    results.failures += evaluation["failures"]
    results.timings.update(evaluation["timings"])
    results.meta.update(evaluation["meta"])
    reporters = ctx.section("reporters", {"json": {}, "html": {}})
    if isinstance(reporters, list):
        reporters = {r: {} for r in reporters}
    if "json" not in reporters:
        raise XAIError("reporters must include json: the gate reads results.json")
    n_before = len(results.failures)
    written = write_reports(
        results,
        ctx.out / layout.REPORT,
        list(reporters),
        get_host(),
        {k: dict(v or {}) for k, v in reporters.items()},
    )
    failed = [f for f in results.failures[n_before:] if f.stage == "report"]
    for name, path in written.items():
        print(f"{name} report: {path}")
    if failed:
        raise XAIError("; ".join(f"reporter {f.name} failed: {f.message}" for f in failed))


# -- gate ----------------------------------------------------------------------------------------
def gate_summary(verdict: dict[str, Any]) -> dict[str, Any]:
    """gate.json: what ``dvc metrics show`` lists (lists of checks do not show there)."""
    from pipelines import store

    checks = verdict.get("checks") or []
    summary: dict[str, Any] = {
        "passed": bool(verdict.get("passed")),
        "status": verdict.get("status"),
        "checks_passed": sum(1 for c in checks if c.get("passed")),
        "checks_failed": sum(1 for c in checks if not c.get("passed")),
    }
    for i, check in enumerate(checks):
        value = store.scalar(check.get("value"))
        if value is not None:
            summary.setdefault("values", {})[str(check.get("name") or f"check_{i}")] = value
    return summary


def gate(ctx: StageContext) -> None:
    from core.plugins import broadcast
    from core.policy import evaluate as evaluate_policy
    from core.policy import format_table, load_policy

    spec = ctx.section("gate", {"checks": []})
    policy = load_policy(spec)
    info = json.loads((ctx.out / layout.MODEL_INFO).read_text())
    verdict = dict(evaluate_policy(policy, str(ctx.out / layout.RESULTS)))
    verdict.setdefault("model", {**ctx.entry, "fingerprint": info["fingerprint"]})
    verdict.setdefault("out_dir", str(ctx.out.resolve()))
    _write_json(ctx.out / layout.VERDICT, verdict)
    _write_json(ctx.out / layout.GATE, gate_summary(verdict))
    broadcast("xai_gate_decided", verdict=verdict)
    print(format_table(verdict))
    print(f"gate {ctx.entry['name']} {ctx.entry['version']}: {verdict.get('status')}")


STAGES = {"resolve": resolve, "explain": explain, "evaluate": evaluate, "report": report, "gate": gate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.stages", description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--key", required=True, help="the version's key in params.yaml 'versions'")
    parser.add_argument("--workspace", default=".", type=Path, help="workspace root (default: .)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: XAI_DEVICE or auto)")
    args = parser.parse_args(argv)
    os.environ.setdefault("XAI_NO_PROGRESS", "1")
    try:
        ctx = StageContext(args.stage, args.key, args.workspace.resolve(), args.device)
        ctx.out.mkdir(parents=True, exist_ok=True)
        STAGES[args.stage](ctx)
    except Exception as exc:
        if not isinstance(exc, XAIError):
            print(redact_text(traceback.format_exc()), file=sys.stderr, end="")
        message = str(exc) if isinstance(exc, XAIError) else f"{type(exc).__name__}: {exc}"
        print(f"error: stage {args.stage}@{args.key} failed: {redact_text(message)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(stage_server.forward(sys.argv[1:], main))
