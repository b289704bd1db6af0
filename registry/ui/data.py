"""What the explorer reads from MLflow: registered models, their versions and tags, and each version's
run (tag ``xai.run_id``, set by the worker) with the files ``registry.runlog`` logged. Paths from the
browser are only served when they are in the run's own artifact listing."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from registry.names import check_name, check_version

MAP_RE = re.compile(r"maps/([A-Za-z0-9_.-]+)/(\d{3})_([A-Za-z0-9_.-]+)\.png")
SIGNED_METHODS = ("lrp", "deeplift")
RUN_TAG_MAX_AGE_S = 10.0


class Explorer:
    """One MLflow client and the run listings and small files already read (runs are immutable once
    logged, so an app keeps them while it runs; bounded)."""

    def __init__(self, tracking_uri: str, max_files: int = 4096):
        from registry.models import client_for

        self.uri = tracking_uri
        self.client = client_for(tracking_uri)
        self._listing: dict[str, list[str]] = {}
        self._files: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self.max_files = max_files
        self._experiment: dict[str, str] = {}  # run id -> experiment id (a run never moves)
        self._runs: dict[tuple[str, str], tuple[float, str | None]] = {}  # (name, version) -> (when, run id)

    def models(self) -> list[dict[str, Any]]:
        out = []
        for rm in self.client.search_registered_models(max_results=1000):
            versions = sorted(
                self.client.search_model_versions(f"name = '{rm.name}'"), key=lambda v: -int(v.version)
            )
            out.append(
                {
                    "name": rm.name,
                    "aliases": dict(getattr(rm, "aliases", {}) or {}),
                    "versions": [self.version_row(v) for v in versions],
                }
            )
        return out

    def version_row(self, mv: Any) -> dict[str, Any]:
        tags = dict(mv.tags or {})
        return {
            "version": str(mv.version),
            "run_id": tags.get("xai.run_id"),
            "gate": tags.get("xai.gate", ""),
            "status": tags.get("xai.status", ""),
            "tags": {k: v for k, v in sorted(tags.items()) if k.startswith("xai.")},
            "run_url": self.run_url(tags.get("xai.run_id")),
        }

    def version(self, name: str, version: str) -> dict[str, Any]:
        mv = self.client.get_model_version(check_name(name), check_version(version))
        return self.version_row(mv)

    def run_of(self, name: str, version: str, max_age: float = RUN_TAG_MAX_AGE_S) -> str | None:
        """The version's run id (tag ``xai.run_id``), read again once ``max_age`` seconds old: a page's
        maps ask for it once each, and one MLflow call per image would dominate the page's time."""
        key = (check_name(name), check_version(version))
        seen = self._runs.get(key)
        if seen is None or time.monotonic() - seen[0] > max_age:
            seen = (time.monotonic(), self.version(*key)["run_id"])
            self._runs[key] = seen
        return seen[1]

    def run_url(self, run_id: str | None) -> str | None:
        if not run_id or not self.uri.startswith(("http://", "https://")):
            return None
        if run_id not in self._experiment:
            try:
                self._experiment[run_id] = self.client.get_run(run_id).info.experiment_id
            except Exception:
                return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self._experiment[run_id]}/runs/{run_id}"

    def listing(self, run_id: str) -> list[str]:
        """Every file of the run (recursive)."""
        if run_id not in self._listing:
            files: list[str] = []
            todo = [None]
            while todo:
                for info in self.client.list_artifacts(run_id, todo.pop()):
                    (todo.append(info.path) if info.is_dir else files.append(info.path))
            self._listing[run_id] = sorted(files)
        return self._listing[run_id]

    def read(self, run_id: str, path: str) -> bytes:
        """A file of the run; refused unless the run lists it."""
        if path not in set(self.listing(run_id)):
            raise KeyError(f"{path!r} is not a file of run {run_id}")
        key = (run_id, path)
        if key not in self._files:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(self.client.download_artifacts(run_id, path, tmp)).read_bytes()
            self._files[key] = data
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    def json_file(self, run_id: str, path: str) -> dict[str, Any]:
        try:
            return json.loads(self.read(run_id, path))
        except (KeyError, ValueError):
            return {}

    def grid(self, run_id: str) -> tuple[list[str], dict[int, dict[str, str]]]:
        """(methods, image index -> method -> map path) from ``maps/<method>/<NNN>_<image>.png``."""
        methods: list[str] = []
        cells: dict[int, dict[str, str]] = {}
        for path in self.listing(run_id):
            m = MAP_RE.fullmatch(path)
            if m:
                if m.group(1) not in methods:
                    methods.append(m.group(1))
                cells.setdefault(int(m.group(2)), {})[m.group(1)] = path
        return methods, cells


def metric_cards(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """method -> scalar metrics (the sanity lists go to the curves)."""
    out: dict[str, dict[str, float]] = {}
    for method, values in (results.get("metrics") or {}).items():
        out[method] = {
            k: float(v)
            for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("seconds")
        }
    return out


def sanity_curves(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One curve per method and randomization (similarity to the original map, layer by layer)."""
    curves = []
    for method, values in (results.get("metrics") or {}).items():
        for kind in ("cascading", "independent"):
            layers = (values or {}).get(f"sanity.{kind}.layers")
            ys = (values or {}).get(f"sanity.{kind}.spearman")
            if isinstance(layers, list) and isinstance(ys, list) and len(ys) == len(layers) and ys:
                curves.append(
                    {
                        "method": method,
                        "kind": kind,
                        "layers": [str(x) for x in layers],
                        "values": [float(y) for y in ys],
                        "svg": svg_points([float(y) for y in ys]),
                    }
                )
    return curves


def svg_points(values: list[float], width: int = 240, height: int = 100) -> str:
    """A polyline's points for values in [-1, 1] on a width x height plot."""
    n = max(len(values) - 1, 1)
    return " ".join(
        f"{i * width / n:.1f},{(1 - (max(-1.0, min(1.0, v)) + 1) / 2) * height:.1f}"
        for i, v in enumerate(values)
    )
