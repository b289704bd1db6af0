"""Where each stage writes, per model version: ``xai-runs/<model>/<version>/`` (the names dvc.yaml uses).

model.pt          resolve   the weights in the xai checkpoint format (later stages need no registry)
model.json        resolve   source URI, fingerprint, architecture, preprocessing, class names
explanations.pt   explain   every method's attributions, maps, targets, extras; predictions
evaluation.pt     evaluate  every metric value (curves included), figures, failures
metrics.json      evaluate  headline scalars per method (DVC metric, not cached)
plots/            evaluate  curves as CSV: step + one value column (DVC plots, not cached)
report/           report    the reporters' files: results.json, report.html, maps.npz, ...
gate.json         gate      the verdict summary (DVC metric, not cached)
verdict.json      gate      the full verdict, every check (core.policy format)
"""

from __future__ import annotations

from pathlib import Path

RUNS_DIR = "xai-runs"
MODEL = "model.pt"
MODEL_INFO = "model.json"
EXPLANATIONS = "explanations.pt"
EVALUATION = "evaluation.pt"
METRICS = "metrics.json"
PLOTS = "plots"
REPORT = "report"
RESULTS = "report/results.json"
HTML = "report/report.html"
GATE = "gate.json"
VERDICT = "verdict.json"
STAGES = ("resolve", "explain", "evaluate", "report", "gate")


def version_dir(workspace: str | Path, entry: dict[str, str]) -> Path:
    """``<workspace>/xai-runs/<name>/<version>`` for a validated params entry."""
    return Path(workspace) / RUNS_DIR / entry["name"] / entry["version"]
