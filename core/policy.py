"""The gate policy: checks on a run's results.json that decide whether a model version may deploy.

A policy is YAML (a file, or the ``gate:`` section of params.yaml)::

    checks:
      - name: grad_cam sensitive to randomization
        method: grad_cam                      # a method label; a list, or "*" for every method;
                                              # omitted: a model-level (global) metric
        metric: sanity.cascading.spearman_full
        op: "<"                               # < <= > >= == != (or lt le gt ge eq ne)
        threshold: 0.4
      - name: AOPC above the random baseline
        method: grad_cam
        metric: faithfulness.aopc
        op: ">"
        than: faithfulness.aopc_random        # compare with another metric (same method, or than_method)
        margin: 0.0                           # value op (other + margin)
      - name: saliency sensitive to cascading randomization
        method: saliency
        metric: sanity.cascading.spearman_full
        op: "<"
        threshold: 0.7
        sanity: true                          # a sanity check: a method that fails one cannot carry
                                              # any other check of this version (they fail too)

A section may instead name a file: ``gate: {policy: policies/default.yaml}``. ``evaluate`` reads
the document the json reporter writes (``metrics[method][key]``, ``global_metrics``,
``failures``). It fails closed: a check whose metric is missing, not a number, or whose metric or
explanation is recorded as failed does not pass (``required: false`` makes a missing value skip
instead). ``method: "*"`` expands to every method the run was asked for (``meta.methods_requested``),
the ones that failed included, so a failed method fails the check; a wildcard that matches no method
fails. A policy without checks fails unless it says ``allow_empty: true``. A failure of the model
itself (``stage: model``, e.g. non-finite outputs) fails every check. ``gate_main`` is ``xai gate``: table on stdout, verdict JSON, exit 0 pass / 1 fail / 2 error.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import XAIError

OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
OP_WORDS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
CHECK_KEYS = (
    "name",
    "method",
    "metric",
    "op",
    "threshold",
    "than",
    "than_method",
    "margin",
    "required",
    "sanity",
)
EXIT_CODES = {"passed": 0, "failed": 1, "error": 2}


class PolicyError(XAIError):
    """A policy that cannot be read or is not valid."""


@dataclass(frozen=True)
class Check:
    """One condition: ``value(method, metric) op threshold`` (or ``op value(than_method, than) + margin``)."""

    name: str
    metric: str
    op: str
    threshold: float | None = None
    than: str | None = None
    method: str | tuple[str, ...] | None = None  # None: a global metric; "*": every method
    than_method: str | None = None
    margin: float = 0.0
    required: bool = True
    sanity: bool = False  # failing it fails every other check of the same method


@dataclass
class Policy:
    checks: list[Check] = field(default_factory=list)
    name: str = "policy"
    source: str | None = None
    allow_empty: bool = False  # an empty policy passes only when it says so


# -- loading ---------------------------------------------------------------------------------------
def load_policy(spec: dict | list | str | Path | Policy) -> Policy:
    """A policy from a YAML file path, a parsed document (``{"checks": [...]}``, a list of checks,
    or a params.yaml document / section with ``gate:``), raising ``PolicyError`` when invalid."""
    if isinstance(spec, Policy):
        return spec
    base, source = Path.cwd(), None
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        spec, source, base = _read_yaml(path), str(path), path.parent
    if isinstance(spec, dict) and "gate" in spec:
        spec = spec["gate"]
    if isinstance(spec, dict) and "policy" in spec:
        extra = sorted(set(spec) - {"policy", "name"})
        if extra:
            raise PolicyError(f"a gate section naming a policy file cannot also hold {', '.join(extra)}")
        path = Path(spec["policy"])
        return load_policy(path if path.is_absolute() else base / path)
    if spec is None:
        spec = {"checks": []}
    if isinstance(spec, list):
        spec = {"checks": spec}
    if not isinstance(spec, dict):
        raise PolicyError(f"a policy is a mapping with 'checks', not {type(spec).__name__}")
    unknown = sorted(set(spec) - {"checks", "name", "description", "allow_empty"})
    if unknown:
        raise PolicyError(f"unknown policy key {unknown[0]!r}; known: checks, name, description, allow_empty")
    allow_empty = spec.get("allow_empty", False)
    if not isinstance(allow_empty, bool):
        raise PolicyError("allow_empty must be true or false")
    raw = spec.get("checks") or []
    if not isinstance(raw, list):
        raise PolicyError("'checks' must be a list")
    checks = [_parse_check(item, i) for i, item in enumerate(raw)]
    names = [c.name for c in checks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PolicyError(f"check name {dup[0]!r} is used twice")
    return Policy(
        checks, str(spec.get("name") or (Path(source).stem if source else "policy")), source, allow_empty
    )


def _read_yaml(path: Path) -> Any:
    import yaml

    if not path.is_file():
        raise PolicyError(f"policy file {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise PolicyError(f"cannot read policy {str(path)!r}: {exc}") from None


def _parse_check(item: Any, index: int) -> Check:
    where = f"check {index + 1}"
    if not isinstance(item, dict):
        raise PolicyError(f"{where}: a check is a mapping (name, method, metric, op, threshold | than)")
    unknown = sorted(set(item) - set(CHECK_KEYS))
    if unknown:
        raise PolicyError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(CHECK_KEYS)}")
    metric = item.get("metric")
    if not isinstance(metric, str) or not metric:
        raise PolicyError(f"{where}: 'metric' (e.g. sanity.cascading.spearman_full) is required")
    op = OP_WORDS.get(str(item.get("op", "")), str(item.get("op", "")))
    if op not in OPS:
        raise PolicyError(f"{where}: op must be one of {' '.join(OPS)}, not {item.get('op')!r}")
    has_threshold, than = "threshold" in item, item.get("than")
    if has_threshold == (than is not None):
        raise PolicyError(f"{where}: give exactly one of 'threshold' and 'than'")
    threshold = None
    if has_threshold:
        threshold = _number(item["threshold"])
        if threshold is None:
            raise PolicyError(f"{where}: threshold must be a number, not {item['threshold']!r}")
    margin = _number(item.get("margin", 0.0))
    if margin is None:
        raise PolicyError(f"{where}: margin must be a number")
    method = item.get("method")
    if isinstance(method, list):
        method = tuple(str(m) for m in method)
    elif method is not None:
        method = str(method)
    required = item.get("required", True)
    if not isinstance(required, bool):
        raise PolicyError(f"{where}: required must be true or false")
    sanity = item.get("sanity", False)
    if not isinstance(sanity, bool):
        raise PolicyError(f"{where}: sanity must be true or false")
    name = item.get("name") or f"{_method_text(method)} {metric} {op} {than if than else threshold}"
    return Check(
        str(name),
        metric,
        op,
        threshold,
        than,
        method,
        str(item["than_method"]) if item.get("than_method") else None,
        margin,
        required,
        sanity,
    )


def _method_text(method: str | tuple[str, ...] | None) -> str:
    if method is None:
        return "model"
    return method if isinstance(method, str) else ",".join(method)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- evaluating ------------------------------------------------------------------------------------
def evaluate(policy: Policy | dict | str | Path, results: dict | str | Path) -> dict[str, Any]:
    """The verdict of ``policy`` on a results document (or the path of results.json):
    ``{"passed", "status": passed|failed|error, "checks": [{name, method, metric, value, op,
    threshold, passed, reason}], ...}``. Never raises for bad results: that is status "error"."""
    try:
        policy = load_policy(policy)
    except XAIError as exc:
        return error_verdict(str(exc))
    source = None
    if not isinstance(results, dict):
        source = str(results)
        try:
            results = json.loads(Path(results).read_text())
        except (OSError, ValueError) as exc:
            return error_verdict(f"cannot read results {source!r}: {exc}", policy)
    if not isinstance(results, dict):
        return error_verdict("results are not a mapping", policy)
    if not isinstance(results.get("metrics", {}), dict):
        return error_verdict("results have no 'metrics' mapping", policy)
    rows = [row for check in policy.checks for row in _evaluate_check(check, results)]
    _sanity_first(rows)
    failed = [r for r in rows if not r["passed"]]
    empty = not rows and not policy.allow_empty
    status = "failed" if failed or empty else "passed"
    summary = f"{len(rows) - len(failed)} of {len(rows)} checks passed"
    if empty:
        summary = "the policy has no checks: nothing was verified (allow_empty: true to pass anyway)"
    verdict: dict[str, Any] = {
        "passed": status == "passed",
        "status": status,
        "policy": policy.name,
        "summary": summary,
        "checks": rows,
    }
    if not rows and policy.allow_empty:
        verdict["warning"] = "the policy has no checks (allow_empty): nothing was verified"
    if policy.source:
        verdict["policy_file"] = policy.source
    if source:
        verdict["results"] = source
    return verdict


def _sanity_first(rows: list[dict[str, Any]]) -> None:
    """A method that failed a sanity check (``sanity: true``) cannot carry its other checks: each
    of them that passed is failed with the sanity checks named as the reason."""
    failed: dict[Any, list[str]] = {}
    for row in rows:
        if row.get("sanity") and not row["passed"]:
            failed.setdefault(row["method"], []).append(row["name"])
    for row in rows:
        if not row.get("sanity") and row["passed"] and row["method"] in failed:
            row.update(
                passed=False,
                reason=f"{row['method']} failed its sanity check ({'; '.join(failed[row['method']])}): "
                f"its other checks cannot carry this version (value passed: {row['reason']})",
            )


def error_verdict(message: str, policy: Policy | None = None) -> dict[str, Any]:
    verdict = {"passed": False, "status": "error", "error": message, "summary": message, "checks": []}
    if policy is not None:
        verdict["policy"] = policy.name
    return verdict


def requested_methods(results: dict) -> list[str]:
    """Every method label the run was asked for: the request list the run recorded, plus the methods
    that produced explanations or metrics and those recorded as failed (explain or fit)."""
    meta = results.get("meta")
    asked = meta.get("methods_requested") if isinstance(meta, dict) else None
    failures = results.get("failures")
    failed = {
        str(f.get("name"))
        for f in (failures if isinstance(failures, list) else [])
        if isinstance(f, dict) and f.get("stage", "explain") in ("explain", "fit") and f.get("name")
    }
    return sorted(
        {str(m) for m in (asked if isinstance(asked, list) else [])}
        | set(results.get("metrics") or {})
        | set(results.get("methods") or {})
        | failed
    )


def _methods(check: Check, results: dict) -> list[str | None]:
    if check.method is None:
        return [None]
    if check.method == "*":
        found: list[str | None] = [*requested_methods(results)]
        return found or ["*"]  # "*" itself: a row that fails (nothing matched)
    return [check.method] if isinstance(check.method, str) else list(check.method)


def _evaluate_check(check: Check, results: dict) -> list[dict[str, Any]]:
    rows = []
    methods = _methods(check, results)
    for method in methods:
        name = check.name if len(methods) == 1 and not (check.method == "*") else f"{check.name} [{method}]"
        row: dict[str, Any] = {
            "name": name,
            "method": method,
            "metric": check.metric,
            "value": None,
            "op": check.op,
            "threshold": check.threshold,
            "passed": False,
            "reason": "",
        }
        if check.sanity:
            row["sanity"] = True
        if check.than:
            row["than"] = check.than
        value, why = lookup(results, method, check.metric)
        other, other_why = (check.threshold, None)
        if check.than:
            other, other_why = lookup(results, check.than_method or method, check.than)
            if other is not None:
                other += check.margin
            row["threshold"] = other
        row["value"] = value
        if method == "*":
            row["reason"] = "the wildcard method '*' matches no method of this run"
        elif why or other_why:
            reason = why or f"comparison value: {other_why}"
            if not check.required and (why or "").startswith("missing"):
                row.update(passed=True, skipped=True, reason=f"not computed ({reason}); optional check")
            else:
                row["reason"] = reason
        elif value is not None and other is not None and OPS[check.op](value, other):
            row.update(passed=True, reason="ok")
        else:
            row["reason"] = f"{_fmt(value)} {check.op} {_fmt(other)} is false"
        rows.append(row)
    return rows


def lookup(results: dict, method: str | None, key: str) -> tuple[float | None, str | None]:
    """The numeric value of metric ``key`` for ``method`` (None: global), or (None, why not)."""
    metric_name = key.split(".", 1)[0]
    failure = _failure(results, method, metric_name)
    if failure:
        return None, failure
    if method is None:
        table = results.get("global_metrics") or {}
    else:
        table = (results.get("metrics") or {}).get(method)
        if table is None:
            return None, f"missing: method {method!r} has no metrics in the results"
    if key not in table:
        skipped = ((results.get("meta") or {}).get("skipped_metrics") or {}).get(metric_name)
        extra = f" (metric {metric_name} was skipped: {skipped})" if skipped else ""
        return None, f"missing: {key} was not computed for {method or 'the model'}{extra}"
    value = _number(table[key])
    if value is None:
        return None, f"{key} = {table[key]!r} is not a finite number"
    return value, None


def _failure(results: dict, method: str | None, metric_name: str) -> str | None:
    for f in results.get("failures") or []:
        name = str(f.get("name", ""))
        if f.get("stage") == "model":
            return f"the model failed ({f.get('kind', '?')}): {f.get('message', '')}"
        hit = (
            name == metric_name
            or (method is not None and name == f"{metric_name}:{method}")
            or (method is None and name == f"{metric_name}:_model")
            or (method is not None and name == method and f.get("stage", "explain") in ("explain", "fit"))
        )
        if hit:
            return f"{f.get('stage', 'run')} of {name} failed ({f.get('kind', '?')}): {f.get('message', '')}"
    return None


# -- presenting ------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def format_table(verdict: dict[str, Any]) -> str:
    """A plain-text table of the checks (value, threshold, pass/fail) and the overall status."""
    rows = [["check", "method", "metric", "value", "op", "threshold", "result"]]
    for c in verdict.get("checks") or []:
        result = "PASS" if c.get("passed") else "FAIL"
        if c.get("skipped"):
            result = "SKIP"
        threshold = c.get("threshold")
        threshold_text = _fmt(threshold) + (f" ({c['than']})" if c.get("than") else "")
        rows.append(
            [
                str(c.get("name")),
                str(c.get("method") or "-"),
                str(c.get("metric")),
                _fmt(c.get("value")),
                str(c.get("op")),
                threshold_text,
                result,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for c in verdict.get("checks") or []:
        if not c.get("passed"):
            lines.append(f"FAIL {c.get('name')}: {c.get('reason')}")
    status = str(verdict.get("status", "error")).upper()
    tail = verdict.get("error") or verdict.get("summary") or ""
    lines.append(f"gate: {status}" + (f" - {tail}" if tail else ""))
    if verdict.get("warning"):
        lines.append(f"warning: {verdict['warning']}")
    return "\n".join(lines)


def gate_main(results_path: str | Path, policy_path: str | Path, out_json: str | Path | None = None) -> int:
    """``xai gate``: evaluate, print the table, write the verdict JSON, announce it to plugins
    (``xai_gate_decided``); returns 0 passed, 1 failed, 2 error."""
    try:
        verdict = evaluate(load_policy(policy_path), results_path)
    except XAIError as exc:
        verdict = error_verdict(str(exc))
    print(format_table(verdict))
    if out_json:
        out = Path(out_json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(verdict, indent=2, allow_nan=False))
        except (OSError, ValueError) as exc:
            print(f"error: cannot write the verdict to {str(out)!r}: {exc}", file=sys.stderr)
            return 2
    from core.plugins import broadcast

    broadcast("xai_gate_decided", verdict=verdict)
    return EXIT_CODES.get(str(verdict.get("status")), 2)
