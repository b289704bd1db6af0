"""The Ray backend of the explain and evaluate stages: warm actors that load the model once.

``xai worker --backend ray`` starts (or joins) a Ray cluster and a pool of named actors
(:func:`start_pool`), then runs the same DVC pipeline as the local backend with ``XAI_RAY_ADDRESS``,
``XAI_RAY_POOL`` and ``XAI_RAY_ACTORS`` in the stages' environment (:func:`pool_env`). The explain
and evaluate stage commands see them and dispatch their work to the pool instead of computing in
their own process; they still write the same outputs, so DVC records them in dvc.lock as usual and
``dvc repro`` after a Ray run has nothing to redo (docs/scale.md).

- explain: the probe set is split into one contiguous shard per actor; each actor runs the engine
  on its shard; the shards are merged in probe order (tensors with one row per image are
  concatenated, anything else is taken from the first shard). A method that fails on any shard is
  recorded as failed for the whole probe, never returned with holes.
- evaluate: metrics aggregate over the whole probe set (Spearman, AOPC curves, ...), so splitting
  the probe would change their values; the unit of work is one (metric, method) pair on the whole
  probe, merged in the order the local backend computes them.

An actor keeps the model of the version it last served (keyed by fingerprint, as actor state, not
in a module-level cache). A lost actor is restarted and its shard retried by Ray
(``max_restarts``/``max_task_retries``); a shard that raises fails the stage with one line.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from core.errors import XAIError

ENV_ADDRESS, ENV_POOL, ENV_ACTORS = "XAI_RAY_ADDRESS", "XAI_RAY_POOL", "XAI_RAY_ACTORS"
NAMESPACE = "xai"
ACTOR_ENV = ("PYTHONPATH", "XAI_DISABLED_PLUGINS", "XAI_NO_PROGRESS", "XAI_TIMEOUT")
MAX_RESTARTS = 3  # a lost actor (process or node) is started again this many times ...
MAX_TASK_RETRIES = 3  # ... and the shard it was running is retried


def enabled() -> bool:
    """True in a stage process started by a Ray-backend worker."""
    return bool(os.environ.get(ENV_ADDRESS))


def _check_reachable(address: str) -> None:
    """A one-line error for an address nothing listens on (ray.init would wait for minutes)."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise XAIError(
            f"Ray address {address!r} is not HOST:PORT (the head node's GCS address, "
            "as `ray start --head` prints it)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise XAIError(f"Ray cluster unreachable at {address}: {exc.strerror or exc}") from None


def connect(address: str | None, num_cpus: int | None = None) -> Any:
    """Join the cluster at ``address`` (None: start a local one). Returns the ``ray`` module."""
    try:
        import ray
    except ImportError:
        raise XAIError("the Ray backend needs ray: pip install 'xai-mlops[ray]'") from None
    if ray.is_initialized():
        return ray
    if address:
        _check_reachable(address)
    kwargs: dict[str, Any] = {
        "namespace": NAMESPACE,
        "log_to_driver": False,
        "logging_level": "ERROR",
        "configure_logging": False,
    }
    if not address:
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:
        raise XAIError(
            f"cannot join the Ray cluster at {address or '(local)'}: "
            f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}"
        ) from None
    return ray


class ShardActor:
    """One warm process: plugins imported and the current version's model loaded once."""

    def __init__(self) -> None:
        self._fingerprint: str | None = None
        self._loaded: Any = None
        self._busy = 0
        self._lock = threading.Lock()  # max_concurrency=2 serves pid()/busy(); work runs one at a time

    def pid(self) -> int:
        return os.getpid()

    def busy(self) -> int:
        """Shards running now (read while one runs: the actor serves two calls at once)."""
        return self._busy

    def _model(self, model: dict[str, Any]) -> Any:
        if model["fingerprint"] != self._fingerprint:
            import ray

            from pipelines import layout
            from pipelines.resolved import load_resolved

            files = ray.get(model["files"][0])
            with tempfile.TemporaryDirectory(prefix="xai-actor-") as tmp:
                (Path(tmp) / layout.MODEL).write_bytes(files["model"])
                (Path(tmp) / layout.MODEL_INFO).write_bytes(files["info"])
                self._loaded, _ = load_resolved(Path(tmp))
            self._fingerprint = model["fingerprint"]
        return self._loaded.model.to(self._device()).eval()

    @staticmethod
    def _device() -> Any:
        import ray
        import torch

        return (
            torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        )

    def _engine(self, job: dict[str, Any]) -> Any:
        from core.engine import Engine

        return Engine(
            device=self._device(),
            batch_size=job["batch_size"],
            timeout=job["timeout"],
            progress=False,
            fit_data=job["fit_data"],
        )

    def explain(
        self, model: dict[str, Any], job: dict[str, Any], inputs: Any, targets: Any
    ) -> dict[str, Any]:
        """The engine on one shard of the probe set."""
        with self._lock:
            self._busy += 1
            try:
                net = self._model(model)
                engine = self._engine(job)
                out = engine.run(net, inputs, job["requests"], targets=targets, isolate=True)
                return {
                    "explanations": out.explanations,
                    "failures": out.failures,
                    "targets": out.targets,
                    "logits": out.logits,
                    "fit_info": engine.fit_info,
                }
            finally:
                self._busy -= 1

    def evaluate(
        self,
        model: dict[str, Any],
        job: dict[str, Any],
        results: Any,
        unit: tuple[str, str | None],
        data: Any,
    ) -> dict[str, Any]:
        """One metric for one method (or for the model) on the whole probe set."""
        import torch

        from core.plugins import get_host
        from core.workflow import compute_metrics

        name, label = unit
        with self._lock:
            self._busy += 1
            try:
                net = self._model(model)
                part = dataclasses.replace(
                    results,
                    explanations={label: results.explanations[label]} if label else {},
                    metrics={},
                    global_metrics={},
                    figures={},
                    failures=[],
                    timings={},
                    meta=dict(results.meta),
                )
                part.meta.pop("skipped_metrics", None)
                with torch.enable_grad():
                    compute_metrics(
                        part,
                        net,
                        self._engine(job),
                        [name],
                        job["requests"],
                        get_host(),
                        {name: job["metrics"].get(name, {})},
                        data,
                    )
                return {
                    "metrics": part.metrics,
                    "global_metrics": part.global_metrics,
                    "figures": part.figures,
                    "failures": part.failures,
                    "timings": part.timings,
                    "skipped": part.meta.get("skipped_metrics", {}),
                }
            finally:
                self._busy -= 1


# -- the worker's side: the pool -------------------------------------------------------------------
def actor_name(pool: str, index: int) -> str:
    return f"{pool}-{index}"


@dataclasses.dataclass
class Pool:
    """A started pool: ``env`` for the stages, ``handles`` to hold while it is used (the actors
    belong to the process that started them: they end when it drops the handles or dies)."""

    env: dict[str, str]
    handles: list[Any]


def start_pool(
    address: str | None, actors: int, gpus_per_actor: float, pool: str, num_cpus: int | None = None
) -> Pool:
    """Connect, check the resources, start ``actors`` named actors."""
    if actors < 1:
        raise XAIError(f"--actors must be at least 1, got {actors}")
    ray = connect(address, num_cpus)
    resources = ray.cluster_resources()
    if gpus_per_actor > resources.get("GPU", 0):
        raise XAIError(
            f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster at {address or '(local)'} has "
            f"{resources.get('GPU', 0):g} GPU(s)"
        )
    # the actors see the plugins the worker sees (the code itself must be installed on every node)
    env = {k: os.environ[k] for k in ACTOR_ENV if os.environ.get(k)}
    cls = ray.remote(
        num_cpus=1,
        num_gpus=gpus_per_actor,
        max_restarts=MAX_RESTARTS,
        max_task_retries=MAX_TASK_RETRIES,
        max_concurrency=2,
        runtime_env={"env_vars": env} if env else None,
    )(ShardActor)
    handles = [cls.options(name=actor_name(pool, i), get_if_exists=True).remote() for i in range(actors)]
    _gather(ray, [h.pid.remote() for h in handles], "starting the actors")  # warm before the first job
    return Pool(
        {ENV_ADDRESS: ray.get_runtime_context().gcs_address, ENV_POOL: pool, ENV_ACTORS: str(actors)}, handles
    )


def stop_pool(pool: Pool) -> None:
    """End the actors of a pool now (their CPUs and GPUs are free for the next pool)."""
    import ray

    for handle in pool.handles:
        ray.kill(handle, no_restart=True)
    pool.handles.clear()


def pool_handles() -> tuple[Any, list[Any]]:
    """(ray, the pool's actors) in a stage process started by a Ray-backend worker."""
    ray = connect(os.environ[ENV_ADDRESS])
    pool, n = os.environ.get(ENV_POOL, "xai"), int(os.environ.get(ENV_ACTORS, "1"))
    try:
        return ray, [ray.get_actor(actor_name(pool, i), namespace=NAMESPACE) for i in range(n)]
    except ValueError as exc:
        raise XAIError(f"Ray actor pool {pool!r} not found on {os.environ[ENV_ADDRESS]}: {exc}") from None


# -- the stages' side ------------------------------------------------------------------------------
def model_payload(ray: Any, out_dir: Path) -> dict[str, Any]:
    """The resolved model as one object in the cluster's store (nested, so only a cold actor fetches it)."""
    import json

    from pipelines import layout

    info = (out_dir / layout.MODEL_INFO).read_bytes()
    ref = ray.put({"model": (out_dir / layout.MODEL).read_bytes(), "info": info})
    return {"fingerprint": json.loads(info)["fingerprint"], "files": [ref]}


def _gather(ray: Any, refs: list[Any], what: str) -> list[Any]:
    try:
        return ray.get(refs)
    except Exception as exc:
        cause = getattr(exc, "cause", None) or exc
        text = str(cause).strip().splitlines()
        reason = text[-1] if text else type(cause).__name__
        if not isinstance(cause, XAIError) and not reason.startswith(type(cause).__name__):
            reason = f"{type(cause).__name__}: {reason}"
        raise XAIError(f"{what} on the Ray cluster failed: {reason[:1000]}") from None


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges, as equal as possible, none empty."""
    shards = max(1, min(shards, n))
    size, extra = divmod(n, shards)
    bounds, start = [], 0
    for i in range(shards):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _merge_value(parts: list[Any], sizes: list[int]) -> Any:
    import torch

    first = parts[0]
    if (
        isinstance(first, torch.Tensor)
        and first.dim() > 0
        and all(isinstance(p, torch.Tensor) and p.dim() > 0 and p.shape[0] == s for p, s in zip(parts, sizes))
    ):
        return torch.cat(parts, 0)
    if isinstance(first, list) and all(isinstance(p, list) and len(p) == s for p, s in zip(parts, sizes)):
        return [x for p in parts for x in p]
    if isinstance(first, dict) and all(isinstance(p, dict) and p.keys() == first.keys() for p in parts):
        return {k: _merge_value([p[k] for p in parts], sizes) for k in first}
    return first


def merge_explanations(shards: list[dict[str, Any]], sizes: list[int], labels: list[str]) -> Any:
    """The shards' engine outputs as one ``EngineOutput`` in probe order."""
    import torch

    from core.engine import EngineOutput
    from core.types import Explanation, Failure

    failures: list[Failure] = []
    seen: set[tuple[str, str]] = set()
    for shard in shards:
        for f in shard["failures"]:
            if (f.name, f.kind) not in seen:
                seen.add((f.name, f.kind))
                failures.append(f)
    failed = {f.name for f in failures}
    explanations = {}
    for label in labels:
        parts = [s["explanations"].get(label) for s in shards]
        if label in failed or any(p is None for p in parts):
            if label not in failed:
                failures.append(Failure(label, label, "exception", "failed on a shard of the probe set"))
            continue
        explanations[label] = Explanation(
            method=parts[0].method,
            attributions=torch.cat([p.attributions for p in parts]),
            maps=torch.cat([p.maps for p in parts]),
            targets=torch.cat([p.targets for p in parts]),
            extras=_merge_value([p.extras for p in parts], sizes),
            params=parts[0].params,
            seconds=sum(p.seconds for p in parts),
        )
    logits = None if any(s["logits"] is None for s in shards) else torch.cat([s["logits"] for s in shards])
    return EngineOutput(explanations, failures, torch.cat([s["targets"] for s in shards]), logits)


def explain(
    out_dir: Path,
    inputs: Any,
    targets: Any,
    requests: list,
    batch_size: int,
    timeout: float | None,
    fit_data: Any,
) -> tuple[Any, dict[str, Any]]:
    """The explain stage's engine run, sharded over the pool. Returns (EngineOutput, fit_info)."""
    ray, actors = pool_handles()
    model = model_payload(ray, out_dir)
    job = {"requests": requests, "batch_size": batch_size, "timeout": timeout, "fit_data": fit_data}
    bounds = shard_bounds(len(inputs), len(actors))
    refs = [
        actors[i].explain.remote(model, job, inputs[a:b], None if targets is None else targets[a:b])
        for i, (a, b) in enumerate(bounds)
    ]
    shards = _gather(ray, refs, f"explain ({len(bounds)} shard(s))")
    merged = merge_explanations(shards, [b - a for a, b in bounds], [r.label for r in requests])
    return merged, shards[0]["fit_info"]


def evaluate(
    out_dir: Path,
    results: Any,
    names: list[str],
    per_method: dict[str, bool],
    requests: list,
    metrics: dict[str, dict],
    batch_size: int,
    timeout: float | None,
    fit_data: Any,
    data: Any,
) -> None:
    """compute_metrics over the pool, one (metric, method) pair per call, merged into ``results``."""
    ray, actors = pool_handles()
    model = model_payload(ray, out_dir)
    job = {
        "requests": requests,
        "batch_size": batch_size,
        "timeout": timeout,
        "fit_data": fit_data,
        "metrics": metrics,
    }
    shared = ray.put(results)
    units = [
        (name, label)
        for name in names
        for label in (list(results.explanations) if per_method[name] else [None])
    ]
    refs = [
        actors[i % len(actors)].evaluate.remote(model, job, shared, unit, data)
        for i, unit in enumerate(units)
    ]
    for part in _gather(ray, refs, f"evaluate ({len(units)} unit(s))"):
        for label, values in part["metrics"].items():
            results.metrics.setdefault(label, {}).update(values)
        results.global_metrics.update(part["global_metrics"])
        results.figures.update(part["figures"])
        known = {(f.plugin, f.name, f.kind) for f in results.failures}
        results.failures.extend(f for f in part["failures"] if (f.plugin, f.name, f.kind) not in known)
        results.timings.update(part["timings"])
        if part["skipped"]:
            results.meta.setdefault("skipped_metrics", {}).update(part["skipped"])
