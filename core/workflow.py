"""One run end to end: explain a batch with every method, compute the metrics, write the reports.

Used by ``xai explain`` and by the pipeline stages. Faults in one plugin are recorded and the rest
of the run goes on (DESIGN.md: fault isolation); bad input files are skipped with their reason.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.engine import Engine, parse_requests
from core.errors import PluginError, XAIError
from core.hooks import ModelState
from core.isolation import call_isolated, restore_or_fail
from core.plugin_api import MetricContext
from core.plugins import PluginHost, broadcast, get_host
from core.session import session
from core.types import Failure, RunResults

DEFAULT_METRICS = ("localization",)
DEFAULT_REPORTERS = ("json", "html")


def _check_names(host: PluginHost, kind: str, names: list[str]) -> None:
    for name in names:
        host.get(kind, name)  # raises UnknownNameError listing the known names


def validate_names(
    methods: Any, metrics: list[str], reporters: list[str], host: PluginHost | None = None
) -> None:
    """Fail fast, before any work, on an unknown method, metric or reporter name."""
    host = host or get_host()
    _check_names(host, "explainer", [r.method for r in parse_requests(methods)])
    _check_names(host, "metric", metrics)
    _check_names(host, "reporter", reporters)


def _finite(values: dict[str, Any]) -> bool:
    for v in values.values():
        if isinstance(v, float) and math.isnan(v):
            return False
    return True


def compute_metrics(
    results: RunResults,
    model: nn.Module,
    engine: Engine,
    metric_names: list[str],
    requests: list,
    host: PluginHost,
    metric_params: dict[str, dict] | None = None,
    data: Any = None,
) -> None:
    """Fill ``results.metrics`` (per method) and ``results.global_metrics``, isolating failures."""
    with session(model):  # every metric's re-explanations share what they derive from the model
        _compute_metrics(results, model, engine, metric_names, requests, host, metric_params or {}, data)


def _compute_metrics(results, model, engine, metric_names, requests, host, metric_params, data) -> None:
    device = next(iter(model.parameters()), torch.zeros(0)).device
    inputs = results.inputs.to(device)
    by_label = {r.label: r for r in requests}
    state = ModelState(model)  # each metric call is checked against it, and the model restored
    for name in metric_names:
        cls: Any = host.get("metric", name)
        try:
            metric = cls(**metric_params.get(name, {}))
        except XAIError as exc:
            results.failures.append(
                Failure(host.provider("metric", name), name, "config", str(exc), "metric")
            )
            continue
        available = {
            "masks": results.masks is not None,
            "spurious_masks": results.spurious_masks is not None,
            "labels": results.labels is not None,
            "explain": True,
            "data": data is not None,
        }
        missing = [r for r in cls.requires if not available.get(r, False)]
        if missing:
            results.meta.setdefault("skipped_metrics", {})[name] = f"needs {', '.join(missing)}"
            continue
        targets = [(None, None)] if not cls.per_method else list(results.explanations.items())
        for label, exp in targets:

            def explain_fn(m, x, t, label=label):
                req = by_label[label]
                sub = Engine(
                    host=engine.host,
                    device=engine.device,
                    batch_size=engine.batch_size,
                    progress=False,
                    fit_data=engine.fit_data,
                    fit_root=engine.fit_root,
                )
                return sub.run(m, x, [req], targets=t, isolate=False, logits=False).explanations[req.label]

            ctx = MetricContext(
                model,
                inputs,
                results.targets.to(device),
                exp,
                results.masks,
                results.spurious_masks,
                results.labels,
                explain_fn if label else None,
                data,
                results,
                device,
            )
            start = time.perf_counter()
            key = label or "_model"
            try:
                values = call_isolated(functools.partial(metric.compute, ctx), engine.timeout, name)
                restore_or_fail(state, name)
                if not isinstance(values, dict):
                    raise PluginError(name, "shape", f"returned {type(values).__name__}, expected a dict")
                if not _finite(values):
                    raise PluginError(name, "nan", "returned NaN")
            except Exception as exc:
                state.restore()
                kind = exc.kind if isinstance(exc, PluginError) else "exception"
                msg = str(exc) if isinstance(exc, XAIError) else f"{type(exc).__name__}: {exc}"
                results.failures.append(
                    Failure(host.provider("metric", name), f"{name}:{key}", kind, msg, "metric")
                )
                continue
            figures = values.pop("_figures", None) if isinstance(values, dict) else None
            if figures:
                for fig_name, png in figures.items():
                    results.figures[f"{name}/{key}/{fig_name}"] = png
            prefixed = {f"{name}.{k}": v for k, v in values.items()}
            if label is None:
                results.global_metrics.update(prefixed)
            else:
                results.metrics.setdefault(label, {}).update(prefixed)
            results.timings[f"metric:{name}:{key}"] = time.perf_counter() - start


def nonfinite_outputs(logits: torch.Tensor) -> list[Failure]:
    """A ``model`` failure when the model's outputs hold NaN or inf (the gate fails every check on
    it; reports still get written, the numbers shown as null)."""
    bad = ~torch.isfinite(logits.detach()).all(dim=1)
    if not bool(bad.any()):
        return []
    rows = bad.nonzero().flatten().tolist()
    return [
        Failure(
            "model",
            "model",
            "nan",
            f"the model's outputs are not finite (NaN or inf) for "
            f"{len(rows)} of {logits.shape[0]} image(s), first index {rows[0]}",
            "model",
        )
    ]


def write_reports(
    results: RunResults,
    out_dir: Path,
    reporter_names: list[str],
    host: PluginHost,
    reporter_params: dict[str, dict] | None = None,
) -> dict[str, str]:
    """Run every reporter (isolated); then broadcast ``xai_report_ready``. Returns name -> path."""
    reporter_params = reporter_params or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    for name in reporter_names:
        try:
            reporter = host.get("reporter", name)(**reporter_params.get(name, {}))
            path = reporter.write(results, out_dir)
            if path is not None:
                written[name] = str(path)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, XAIError) else f"{type(exc).__name__}: {exc}"
            results.failures.append(
                Failure(
                    host.provider("reporter", name) if name in host.names("reporter") else name,
                    name,
                    "exception",
                    msg,
                    "report",
                )
            )
    # reporters that ran before a later reporter failed still hold the earlier failures; rewrite json
    if "json" in written and any(f.stage == "report" for f in results.failures):
        try:
            host.get("reporter", "json")().write(results, out_dir)
        except Exception as exc:  # pragma: no cover - the json reporter failing twice
            print(f"warning: could not rewrite results.json: {exc}", file=sys.stderr)
    broadcast("xai_report_ready", results=results, out_dir=out_dir)
    return written


def run(
    model: nn.Module,
    inputs: torch.Tensor,
    methods: Any,
    *,
    images: torch.Tensor | None = None,
    targets: Any = None,
    labels: torch.Tensor | None = None,
    image_names: list[str] | None = None,
    class_names: list[str] | None = None,
    masks: torch.Tensor | None = None,
    spurious_masks: torch.Tensor | None = None,
    metrics: list[str] | tuple[str, ...] = DEFAULT_METRICS,
    metric_params: dict[str, dict] | None = None,
    reporters: list[str] | tuple[str, ...] = DEFAULT_REPORTERS,
    reporter_params: dict[str, dict] | None = None,
    out_dir: str | Path | None = None,
    batch_size: int | None = 32,
    device: Any = None,
    timeout: float | None = None,
    progress: bool = True,
    fit_data: Any = None,
    data: Any = None,
    meta: dict | None = None,
    skipped_inputs: list[dict[str, str]] | None = None,
    host: PluginHost | None = None,
) -> RunResults:
    """Explain ``inputs`` with ``methods``, evaluate with ``metrics``, report with ``reporters``."""
    host = host or get_host()
    requests = parse_requests(methods)
    metrics, reporters = list(metrics), list(reporters)
    validate_names(requests, metrics, reporters, host)
    engine = Engine(
        host=host, device=device, batch_size=batch_size, timeout=timeout, progress=progress, fit_data=fit_data
    )
    with session(model):  # the explanations and the metrics' re-explanations share what they derive
        out = engine.run(model, inputs, requests, targets=targets, isolate=True)
        if out.logits is None:  # asked for (logits=True, the default): the engine's promise
            raise RuntimeError("the engine returned no logits")
        probs = torch.softmax(out.logits, dim=1)
        results = RunResults(
            inputs=inputs.detach().cpu(),
            images=(images if images is not None else inputs).detach().cpu(),
            targets=out.targets,
            predictions=out.logits.argmax(1),
            probabilities=probs,
            labels=labels,
            image_names=list(image_names or [f"image_{i}" for i in range(inputs.shape[0])]),
            class_names=class_names,
            masks=masks,
            spurious_masks=spurious_masks,
            explanations=out.explanations,
            failures=list(out.failures),
            skipped_inputs=list(skipped_inputs or []),
            meta=dict(meta or {}),
        )
        results.meta["methods_requested"] = [r.label for r in requests]
        results.failures.extend(nonfinite_outputs(out.logits))
        for label, exp in out.explanations.items():
            results.timings[label] = exp.seconds
        if engine.fit_info:
            results.meta["fitted"] = engine.fit_info
        with torch.enable_grad():
            compute_metrics(results, model, engine, metrics, requests, host, metric_params, data)
        if out_dir is not None:
            results.meta["reports"] = write_reports(results, Path(out_dir), reporters, host, reporter_params)
        return results
