"""Side-by-side timing of our explainers against their peer libraries and against the limit.

A suite is a module ``bench/suite_<name>.py`` defining::

    def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]

Each ``Case`` holds zero-argument callables: ``ours`` (our method) and optionally ``peer`` (the same
method in a peer library, same model, inputs and settings, the peer at its best settings). The
harness times them in one process on the same inputs: one warm-up call each, then ``repeats``
rounds of (limit, ours, peer) interleaved so that load changes hit all three alike; it reports
medians. The limit is one forward plus one input-gradient backward of the same images: the cost
of the cheapest gradient explanation. A case whose first call already takes longer than
``long_s`` seconds counts that call as its measurement (the warm-up is negligible there).

A suite that fails to import, or a case that raises, becomes a row with an error, never a crash.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.api import session

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"


@dataclass
class Case:
    """One timed comparison. ``batch``: the case explains only the first ``batch`` images (for
    methods too slow for the whole batch on a CPU); the limit is then measured on those images."""

    method: str
    ours: Callable[[], Any]
    peer_name: str | None = None
    peer: Callable[[], Any] | None = None
    note: str = ""
    batch: int | None = None


@dataclass
class Row:
    """One case's result. Times are per round (rounds interleave limit, ours, peer); the ratios are
    medians of the per-round ratios, so that a change of machine load between rounds cancels."""

    model: str
    suite: str
    method: str
    peer: str | None = None
    ours_runs: list[float] = field(default_factory=list)
    peer_runs: list[float] = field(default_factory=list)
    limit_runs: list[float] = field(default_factory=list)
    images: int = 0
    note: str = ""
    error: str | None = None
    peer_error: str | None = None

    @staticmethod
    def _median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    @property
    def ours_s(self) -> float | None:
        return self._median(self.ours_runs)

    @property
    def peer_s(self) -> float | None:
        return self._median(self.peer_runs)

    @property
    def limit_s(self) -> float | None:
        return self._median(self.limit_runs)

    @property
    def ours_over_limit(self) -> float | None:
        """our time / the limit's, median over rounds: 1.0 means one forward + backward."""
        pairs = [o / lim for o, lim in zip(self.ours_runs, self.limit_runs) if lim > 0]
        return self._median(pairs)

    @property
    def speedup(self) -> float | None:
        """peer time / our time, median over rounds: above 1 means we are faster."""
        pairs = [p / o for o, p in zip(self.ours_runs, self.peer_runs) if o > 0]
        return self._median(pairs)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(
            ours_s=self.ours_s,
            peer_s=self.peer_s,
            limit_s=self.limit_s,
            rounds=len(self.ours_runs),
            ours_over_limit=self.ours_over_limit,
            speedup=self.speedup,
        )
        return d


@dataclass
class Settings:
    models: list[str] = field(default_factory=lambda: ["resnet18", "vgg11"])
    batch: int = 16
    size: int = 112
    device: str = "cpu"
    repeats: int = 3
    suites: list[str] | None = None
    json_path: Path = DEFAULT_JSON
    long_s: float = 10.0
    seed: int = 0
    quick: bool = False
    methods: list[str] | None = None  # only cases whose method starts with one of these


# -- models and inputs -----------------------------------------------------------------------------
class TinyCNN(nn.Module):
    """A small CNN (functional ReLUs, max-pool, GAP + linear) for smoke runs and tests."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(nn.functional.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def make_model(name: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """A random-weight model: ``resnet18``/``vgg11``/any torchvision classifier name, or ``tiny``."""
    torch.manual_seed(seed)
    if name == "tiny":
        return TinyCNN(num_classes).eval()
    import torchvision

    builder = getattr(torchvision.models, name, None)
    if builder is None:
        raise ValueError(f"unknown model {name!r}: use tiny or a torchvision classifier name")
    return builder(num_classes=num_classes).eval()


def make_inputs(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g)


def limit_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Callable[[], Any]:
    """One forward and one backward to the input: the floor of any gradient explanation."""

    def run() -> torch.Tensor:
        x = inputs.detach().clone().requires_grad_()
        out = model(x)
        (g,) = torch.autograd.grad(out.gather(1, targets.view(-1, 1)).sum(), x)
        return g

    return run


# -- timing ----------------------------------------------------------------------------------------
def seconds(fn: Callable[[], Any], sync: bool | None = None) -> float:
    """Wall seconds of one call of ``fn``; ``sync`` (None: whenever CUDA is in use) waits for the
    GPU before and after, so that queued kernels are counted."""
    if sync is None:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def quiet(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` with its warnings silenced (peers warn about deprecated or slow settings)."""

    def run() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn()

    return run


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def time_case(
    case: Case, limit: Callable[[], Any], repeats: int, long_s: float = 10.0, sync: bool = False
) -> tuple[list[float], list[float], list[float], str | None, str | None]:
    """Per-round seconds of (ours, peer, limit) and the errors, if any (never raises).

    One warm-up call of each, then ``repeats`` rounds of limit, ours, peer; when a warm-up call took
    more than ``long_s`` seconds, one round. Warm-up calls are never timed: the first call in a
    process pays its first-touch memory (AttnLRP on ViT-B/16 at batch 8: 13.9 s cold, 7.8 warm),
    and counting it would charge whichever side runs first."""
    peer_error = None
    t_ours: list[float] = []
    t_peer: list[float] = []
    t_limit: list[float] = []
    try:
        first = seconds(case.ours, sync)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return [], [], [], _short(exc) + _where(exc), None
    first_limit = seconds(limit, sync)
    peer = case.peer
    first_peer = None
    if peer is not None:
        try:
            first_peer = seconds(peer, sync)
        except Exception as exc:  # noqa: BLE001
            peer_error, peer = _short(exc), None
    rounds = 1 if max(first, first_limit, first_peer or 0.0) > long_s else max(1, repeats)
    for _ in range(rounds):
        t_limit.append(seconds(limit, sync))
        t_ours.append(seconds(case.ours, sync))
        if peer is not None:
            t_peer.append(seconds(peer, sync))
    return t_ours, t_peer, t_limit, None, peer_error


def _where(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    return f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""


# -- suites ----------------------------------------------------------------------------------------
def discover(names: list[str] | None = None, directory: Path = BENCH_DIR) -> dict[str, Any]:
    """Import every ``suite_*.py`` of ``directory`` (or the named ones): name -> module or the
    import error."""
    found: dict[str, Any] = {}
    for path in sorted(Path(directory).glob("suite_*.py")):
        name = path.stem[len("suite_") :]
        if names and name not in names:
            continue
        try:
            if Path(directory).resolve() == BENCH_DIR:
                found[name] = importlib.import_module(f"bench.{path.stem}")
            else:
                spec = importlib.util.spec_from_file_location(f"bench_suite_{name}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                found[name] = module
        except Exception as exc:  # noqa: BLE001 - a broken suite is a row, not a crash
            found[name] = exc
    for name in names or []:
        found.setdefault(name, ModuleNotFoundError(f"no bench/suite_{name}.py"))
    return found


def run_model(
    model_name: str,
    settings: Settings,
    suites: dict[str, Any],
    model: nn.Module | None = None,
    log: Callable[[str], None] = print,
) -> list[Row]:
    device = torch.device(settings.device)
    model = (model if model is not None else make_model(model_name, seed=settings.seed)).to(device).eval()
    inputs = make_inputs(settings.batch, settings.size, settings.seed).to(device)
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    sync = device.type == "cuda"
    rows: list[Row] = []
    for suite_name, module in suites.items():
        if isinstance(module, BaseException):
            rows.append(Row(model_name, suite_name, "(suite)", error=f"import failed: {_short(module)}"))
            continue
        try:
            cases = module.cases(model, inputs, targets)
        except Exception as exc:  # noqa: BLE001
            rows.append(
                Row(model_name, suite_name, "(suite)", error=f"cases() failed: {_short(exc)}{_where(exc)}")
            )
            continue
        if settings.methods:
            cases = [c for c in cases if any(c.method.startswith(m) for m in settings.methods)]
        limits: dict[int, Callable[[], Any]] = {}
        for case in cases:
            n = min(case.batch or inputs.shape[0], inputs.shape[0])
            limit = limits.setdefault(n, limit_fn(model, inputs[:n], targets[:n]))
            log(
                f"  {model_name} / {suite_name} / {case.method}"
                + (f" vs {case.peer_name}" if case.peer_name else "")
            )
            # one session per case: repeated calls of ours keep what they derive from the model (the
            # folded and frozen copies, LRP's rules), as a user's loop under ``session(model)`` does
            with session(model):
                ours, peer, lim, err, perr = time_case(case, limit, settings.repeats, settings.long_s, sync)
            rows.append(
                Row(
                    model_name,
                    suite_name,
                    case.method,
                    case.peer_name,
                    ours,
                    peer,
                    lim,
                    n,
                    case.note,
                    err,
                    perr,
                )
            )
    return rows


# -- output ----------------------------------------------------------------------------------------
def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def table(rows: list[Row]) -> str:
    head = ["model", "suite", "method", "peer", "imgs", "rounds", "ours/limit", "peer/ours", "ours s", "note"]
    body = []
    for r in rows:
        note = r.error and f"ERROR {r.error}" or (r.peer_error and f"peer failed: {r.peer_error}") or r.note
        body.append(
            [
                r.model,
                r.suite,
                r.method,
                r.peer or "-",
                str(r.images or "-"),
                str(len(r.ours_runs)),
                _fmt(r.ours_over_limit),
                _fmt(r.speedup),
                _fmt(r.ours_s, ".3f"),
                note or "",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths[-1] = len(head[-1])
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(lines)


def write_json(rows: list[Row], settings: Settings, path: Path, seconds: float) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "models": settings.models,
        "batch": settings.batch,
        "size": settings.size,
        "device": settings.device,
        "repeats": settings.repeats,
        "quick": settings.quick,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "seconds": round(seconds, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ratios": "medians over interleaved rounds of ours/limit (limit: one forward + one input-gradient "
        "backward of the same images) and of peer/ours (> 1: we are faster)",
    }
    if settings.device.startswith("cuda") and torch.cuda.is_available():
        meta["gpu"] = torch.cuda.get_device_name(0)
    path.write_text(json.dumps({"meta": meta, "rows": [r.as_dict() for r in rows]}, indent=2))
    return path


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,vgg11", help="comma-separated: resnet18, vgg11, tiny, ...")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 16; quick: 2)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default 112; quick: 64)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed rounds after the warm-up (default 3; quick: 1)"
    )
    p.add_argument(
        "--suites", default=None, help="comma-separated suite names (default: every bench/suite_*.py)"
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (prefixes) to time, e.g. saliency,score_cam (default: all)",
    )
    p.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    p.add_argument(
        "--long", type=float, default=10.0, help="a first call longer than this is the measurement"
    )
    p.add_argument("--quick", action="store_true", help="fast smoke: batch 2, 64 px, 1 repeat")
    a = p.parse_args(argv)
    quick = bool(a.quick)
    return Settings(
        models=[m.strip() for m in a.models.split(",") if m.strip()],
        batch=a.batch or (2 if quick else 16),
        size=a.size or (64 if quick else 112),
        device=a.device,
        repeats=a.repeats or (1 if quick else 3),
        suites=[s.strip() for s in a.suites.split(",") if s.strip()] if a.suites else None,
        json_path=Path(a.json),
        long_s=a.long,
        quick=quick,
        methods=[m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None,
    )


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    start = time.perf_counter()
    suites = discover(settings.suites)
    rows: list[Row] = []
    for name in settings.models:
        print(f"{name}: batch {settings.batch}, {settings.size} px, {settings.device}", flush=True)
        try:
            rows += run_model(name, settings, suites, log=lambda s: print(s, flush=True))
        except Exception as exc:  # noqa: BLE001
            rows.append(Row(name, "-", "(model)", error=_short(exc)))
    seconds = time.perf_counter() - start
    print()
    print(table(rows))
    path = write_json(rows, settings, settings.json_path, seconds)
    print(f"\n{len(rows)} rows in {seconds:.0f} s; ratios are medians of the same run; results: {path}")
    return 0
