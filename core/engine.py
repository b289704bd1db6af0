"""The engine: runs explainers batched, on one device, isolating plugin faults.

It owns everything the explainers share: device placement, target selection (the predicted class
by default), batching, one shared forward/backward for the methods that can use it, upsampling and
normalization of maps, per-method wall time, and restoring the model afterwards, even on error.
Each run holds a session of the model (``core.session``): what the methods derive from it lasts
for the run, or for the caller's ``with session(model):`` block.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from core.errors import ModelError, PluginError, XAIError
from core.hooks import ModelState, preserved_model
from core.isolation import ISOLATION_MODES, call_isolated, check_tensor, restore_or_fail
from core.layers import default_layer
from core.passes import merge_requests
from core.plugin_api import Explainer
from core.plugins import PluginHost, get_host
from core.session import session, structural
from core.tensors import as_target_tensor, batch_slices, normalize_maps, spatial_size, upsample
from core.types import Explanation, Failure


@dataclass
class MethodRequest:
    """One method to run: its registered name, parameters, and the label results are keyed by."""

    method: str
    params: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.method


def parse_requests(methods: Any) -> list[MethodRequest]:
    """Accept ``"a,b"``, ``["a", "b"]``, ``{"a": {params}}`` or ``[{"method": .., "params": ..}]``."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    if isinstance(methods, dict):
        methods = [{"method": k, "params": v or {}} for k, v in methods.items()]
    out: list[MethodRequest] = []
    for item in methods:
        if isinstance(item, MethodRequest):
            out.append(item)
        elif isinstance(item, str):
            out.append(MethodRequest(item))
        elif isinstance(item, dict):
            unknown = sorted(set(item) - {"method", "params", "label"})
            if "method" not in item or unknown:  # a stray key ("layer": ...) would be ignored silently
                reason = f"unknown key {', '.join(unknown)}" if unknown else "no method key"
                raise XAIError(
                    f"a method entry takes the keys method, params and label ({reason}); method"
                    " parameters go under params: {'method': 'grad_cam', 'params': {'layer': ...}}"
                )
            params = dict(item.get("params") or {})
            out.append(MethodRequest(item["method"], params, item.get("label", "")))
        else:
            name, params = item
            out.append(MethodRequest(name, dict(params or {})))
    labels = [r.label for r in out]
    dup = {x for x in labels if labels.count(x) > 1}
    if dup:
        raise XAIError(
            f"method label(s) {', '.join(sorted(dup))} requested twice: give each a distinct label"
        )
    return out


def resolve_device(device: str | torch.device | None, model: nn.Module | None = None) -> torch.device:
    """``None``/"auto": the model's device if it has parameters on one, else CUDA when present."""
    if device is None or str(device) == "auto":
        env = os.environ.get("XAI_DEVICE")
        if env and env != "auto":
            return torch.device(env)
        if model is not None:
            p = next(iter(model.parameters()), None)
            if p is not None and (device is None):
                return p.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


META_FORWARD_PARAMETERS = 20_000_000
"""From this many parameters up, ``class_count`` first infers the output shape on the meta device.
One thread, 224 px, meta / real: ViT-B/16 0.15 / 0.55 s, Swin-T 0.11 / 0.17, ResNet-50 0.05 /
0.11, ViT-S 0.10 / 0.14; below, the real forward is the cheaper (EfficientNet-B0, 5 M parameters:
0.07 / 0.03)."""


def class_count(model: nn.Module, inputs: torch.Tensor) -> int:
    """How many classes ``model`` outputs for inputs like ``inputs``: one row's forward, once per
    input shape in a session of the model (``core.session``). On a large model the shapes are
    inferred on the meta device (no arithmetic, the same answer); a forward that cannot run there
    (data-dependent control flow, an op without a meta kernel) or returns anything but one row of
    logits falls back to the real forward and its checks."""
    key = ("class_count", tuple(inputs.shape[1:]), inputs.dtype)
    return structural(model, key, lambda: _class_count(model, inputs))


def _class_count(model: nn.Module, inputs: torch.Tensor) -> int:
    if sum(p.numel() for p in model.parameters()) >= META_FORWARD_PARAMETERS:
        count = _meta_class_count(model, inputs)
        if count is not None:
            return count
    return forward_logits(model, inputs[:1], None).shape[1]


def _meta_class_count(model: nn.Module, inputs: torch.Tensor) -> int | None:
    tensors = {name: torch.empty_like(t, device="meta") for name, t in model.named_parameters()}
    tensors.update({name: torch.empty_like(t, device="meta") for name, t in model.named_buffers()})
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, tensors, (inputs[:1].to("meta"),), strict=False)
    except Exception:  # noqa: BLE001 - the real forward then runs and reports
        return None
    if isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1:
        return int(out.shape[1])
    return None


def _typed(exc: BaseException) -> str:
    """``exc`` as ``Type: message``: what a failure says of an exception that is not an XAIError."""
    return f"{type(exc).__name__}: {exc}"


def _message(exc: BaseException) -> str:
    """A failure's message: an XAIError's own (written for the user), else ``_typed(exc)``."""
    return str(exc) if isinstance(exc, XAIError) else _typed(exc)


def forward_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """Logits of ``inputs`` in batches, checking the model behaves like a classifier."""
    outs = []
    with torch.no_grad():
        for sl in batch_slices(inputs.shape[0], batch_size):
            try:
                out = model(inputs[sl])
            except Exception as exc:
                raise ModelError(f"the model failed on the inputs: {_typed(exc)}") from exc
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != inputs[sl].shape[0]:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(f"the model's output has shape {shape}; expected batch x classes")
            outs.append(out.float())
    return torch.cat(outs)


@dataclass
class EngineOutput:
    explanations: dict[str, Explanation]
    failures: list[Failure]
    targets: torch.Tensor
    logits: torch.Tensor | None  # None: not asked for (Engine.run(logits=False))


class _BatchResults(NamedTuple):
    """What ``Engine._run_batches`` produced: the explanations, the logits of a fused run (None
    when no shared pass ran) and the targets actually explained, slice by slice."""

    explanations: dict[str, Explanation]
    logits: torch.Tensor | None
    targets: torch.Tensor | None


class Engine:
    """Batched, device-aware, fault-isolating execution of explainer plugins."""

    def __init__(
        self,
        host: PluginHost | None = None,
        device: str | torch.device | None = None,
        batch_size: int | None = 32,
        timeout: float | None = None,
        progress: bool = True,
        fit_data: Any = None,
        fit_root: Any = None,
    ):
        self.host = host or get_host()
        self.device, self.batch_size, self.timeout, self.progress = device, batch_size, timeout, progress
        self.fit_data, self.fit_root = fit_data, fit_root
        self.fit_info: dict[str, dict[str, Any]] = {}
        self._modes: dict[str, str] = {}  # per run: label -> isolation mode
        self._state: ModelState | None = None  # per run: the model before any plugin call

    def make_explainer(self, request: MethodRequest) -> Explainer:
        cls: Any = self.host.get("explainer", request.method)
        params = dict(request.params)
        params.pop("isolate", None)  # the engine's (see _isolation_mode), not the method's
        if "batch_size" in params and "batch_size" not in cls.params:
            params.pop("batch_size")
        return cls(**params)

    def run(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        methods: Any,
        targets: Any = None,
        isolate: bool | str = True,
        logits: bool = True,
    ) -> EngineOutput:
        """Explain ``inputs`` with every requested method. With ``isolate`` a failing method is
        recorded in ``failures``; without it the first failure is raised. ``isolate="process"``
        (or a method's own ``isolate: process`` parameter) runs each plugin call in a child process
        killed at the time limit (core.isolation). After every plugin call the model's parameters
        and buffers are compared with their values before it: a method that changed them is
        restored and recorded as failed (kind "model"). ``logits`` False (with
        ``targets`` given): the caller does not need the model's logits, so methods without a
        shared pass are spared a forward of the whole batch (one row still checks the targets);
        ``EngineOutput.logits`` is then None unless a shared pass produced them."""
        want_logits = logits or targets is None
        requests = parse_requests(methods)
        if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise XAIError(f"inputs must be a B x C x H x W tensor, got {shape}")
        original_device = model_device(model)
        device = resolve_device(self.device, model)
        failures: list[Failure] = []
        explainers: dict[str, Explainer] = {}
        self._modes.clear()
        for req in requests:
            try:
                self._modes[req.label] = _isolation_mode(req, isolate)
                explainers[req.label] = self.make_explainer(req)
            except XAIError as exc:
                self._record_or_raise(failures, isolate, req, "config", exc, plugin=req.method)
        if isinstance(model, torch.jit.ScriptModule):
            self._refuse_python_methods(explainers, failures, isolate, requests)
        moved = device != original_device
        try:
            if moved:
                model.to(device)
            with session(model) as run_session:
                if moved:  # copies derived on another device are not this run's
                    run_session.weights_changed()
                self._state = ModelState(model)
                with preserved_model(model, state=self._state):
                    x = inputs.detach().to(device=device, dtype=torch.float32)
                    # With shared-pass methods, their one forward/backward per batch also yields the
                    # logits and the predicted classes: no separate forward just for the logits.
                    fused = any(e.pass_request is not None for e in explainers.values())
                    t, out_logits = self._targets_and_logits(model, x, targets, fused, want_logits)
                    td = t.to(device) if t is not None else None
                    self._set_default_layers(model, x, explainers, failures, isolate, requests)
                    self._fit_trainable(model, x, explainers, failures, isolate, requests)
                    batches = self._run_batches(model, x, td, requests, explainers, failures, isolate, fused)
                    explanations = batches.explanations
                    if fused:
                        out_logits = batches.logits
                        t = None if batches.targets is None else batches.targets.cpu()
        finally:
            if moved:
                model.to(original_device)
        assert t is not None  # a fused pass returns the targets it explained
        return EngineOutput(explanations, failures, t, None if out_logits is None else out_logits.cpu())

    def _targets_and_logits(
        self, model: nn.Module, x: torch.Tensor, targets: Any, fused: bool, want_logits: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The targets to explain and the logits, before any method runs. A fused run leaves both
        to its shared passes (targets None: the predicted classes); otherwise one batched forward
        gives the logits when they are wanted, else one row's forward checks the given targets."""
        if fused:
            return (None if targets is None else as_target_tensor(targets, x.shape[0])), None
        if not want_logits:
            return as_target_tensor(targets, x.shape[0], class_count(model, x)), None
        logits = forward_logits(model, x, self.batch_size)
        if targets is None:
            return logits.argmax(1).cpu(), logits
        return as_target_tensor(targets, x.shape[0], logits.shape[1]), logits

    # -- internals -------------------------------------------------------------------------------
    def _provider(self, req: MethodRequest) -> str:
        try:
            return self.host.provider("explainer", req.method)
        except KeyError:
            return req.method

    def _record_or_raise(
        self,
        failures: list[Failure],
        isolate: bool | str,
        req: MethodRequest,
        kind: str,
        error: BaseException | str,
        *,
        plugin: str | None = None,
        describe: Callable[[BaseException], str] = _message,
        wrap: bool = False,
    ) -> None:
        """One method failed: with ``isolate`` record it in ``failures`` (as ``plugin``, by default
        the method's provider, with the message ``describe`` gives, or ``error`` itself when it is
        a message), else raise. Raised: an exception as it is, or with ``wrap`` a non-XAIError as
        a PluginError of the method chained to it; a message as an XAIError. The caller drops the
        method from the rest of the run."""
        if not isolate:
            if isinstance(error, str):
                raise XAIError(error)
            if wrap and not isinstance(error, XAIError):
                raise PluginError(req.method, "exception", _typed(error)) from error
            raise error
        message = error if isinstance(error, str) else describe(error)
        plugin = self._provider(req) if plugin is None else plugin
        failures.append(Failure(plugin, req.label, kind, message))

    def _refuse_python_methods(self, explainers, failures, isolate, requests) -> None:
        """A TorchScript model: refuse the methods that hook its layers or change its backward."""
        for req in requests:
            e = explainers.get(req.label)
            if e is None or not e.needs_python_modules():
                continue
            message = (
                f"{req.method} needs the model's Python modules (it hooks layers or changes the "
                "backward pass), which a TorchScript model does not expose: explain the nn.Module "
                "(an xai checkpoint) instead"
            )
            self._record_or_raise(failures, isolate, req, "config", message)
            explainers.pop(req.label)

    def _set_default_layers(self, model, x, explainers, failures, isolate, requests) -> None:
        for req in requests:
            e = explainers.get(req.label)
            if e is None or "layer" not in e.config:
                continue
            if e.config["layer"] is None:
                try:
                    e.config["layer"] = default_layer(model, x[:1])
                except Exception as exc:  # noqa: BLE001 - one method's failure, not the run's
                    self._record_or_raise(failures, isolate, req, "config", exc)
                    explainers.pop(req.label)
            elif isinstance(e.config["layer"], nn.Module):
                from core.layers import resolve_layer

                e.config["layer"] = resolve_layer(model, e.config["layer"])[0]

    def _fit_trainable(self, model, x, explainers, failures, isolate, requests) -> None:
        """Fit (or load the stored state of) every trainable explainer before explaining."""
        from core.fitting import FitData, ensure_fitted

        for req in requests:
            e = explainers.get(req.label)
            if e is None or not e.trainable:
                continue
            try:
                data = self.fit_data if self.fit_data is not None else FitData(x)
                with torch.enable_grad():
                    self.fit_info[req.label] = self._call(
                        req.label,
                        lambda e=e, data=data: ensure_fitted(
                            e, model, data, self.fit_root, input_shape=tuple(x.shape[1:])
                        ),
                        "thread",
                    )  # fitting keeps state in this process
            except Exception as exc:
                # a fitting failure names the exception's type, an XAIError's too
                self._record_or_raise(failures, isolate, req, "fit", exc, describe=_typed)
                explainers.pop(req.label)

    def _run_batches(
        self, model, x, targets, requests, explainers, failures, isolate, fused: bool
    ) -> _BatchResults:
        """Run every method slice by slice. ``fused``: the run left the logits to a shared pass per
        slice (its logits alone once no shared method is left), and with ``targets`` None the
        predicted classes too; the logits and targets actually used are returned."""
        parts: dict[str, list[Any]] = {r.label: [] for r in requests if r.label in explainers}
        seconds: dict[str, float] = dict.fromkeys(parts, 0.0)
        failed: set[str] = set()
        slices = list(batch_slices(x.shape[0], self.batch_size))
        by_label = {r.label: r for r in requests}
        bar = tqdm(
            total=len(slices) * len(parts),
            desc="explaining",
            unit="step",
            delay=2.0,
            disable=not self.progress or os.environ.get("XAI_NO_PROGRESS") == "1",
            leave=False,
        )

        def fail(label: str, exc: BaseException) -> None:
            kind = exc.kind if isinstance(exc, PluginError) else "exception"
            self._record_or_raise(failures, isolate, by_label[label], kind, exc, wrap=True)
            failed.add(label)

        slice_logits: list[torch.Tensor] = []
        slice_targets: list[Any] = []  # tensors: given (targets not None) or a shared pass's
        try:
            for sl in slices:
                xb, tb = x[sl], (targets[sl] if targets is not None else None)
                shared = [
                    lab for lab in parts if explainers[lab].pass_request is not None and lab not in failed
                ]
                if fused:
                    logits_b, tb = self._run_shared(
                        model, xb, tb, shared, explainers, parts, seconds, fail, bar
                    )
                    slice_logits.append(logits_b.float())
                slice_targets.append(tb)
                for lab in parts:
                    if lab in failed or explainers[lab].pass_request is not None:
                        continue
                    e = explainers[lab]
                    start = time.perf_counter()
                    try:
                        out = self._call(lab, lambda e=e, xb=xb, tb=tb: e.explain(model, xb, tb))
                        parts[lab].append(self._validated(lab, e, out, xb))
                    except Exception as exc:
                        fail(lab, exc)
                    seconds[lab] += time.perf_counter() - start
                    bar.update(1)
        finally:
            bar.close()
        targets = torch.cat(slice_targets) if slice_targets else targets
        logits = torch.cat(slice_logits).cpu() if fused and slice_logits else None
        result: dict[str, Explanation] = {}
        for lab, chunks in parts.items():
            if lab in failed or not chunks:
                continue
            e = explainers[lab]
            try:
                result[lab] = self._assemble(lab, e, chunks, x, targets, seconds[lab])
            except Exception as exc:
                fail(lab, exc)
        return _BatchResults(result, logits, targets)

    def _run_shared(self, model, xb, tb, labels, explainers, parts, seconds, fail, bar):
        """One forward/backward for every shared method of the slice (one extra backward per ReLU
        rule); returns the slice's logits and targets (``tb`` None: the predicted classes)."""
        if not labels:  # every shared method failed earlier: the logits alone
            return self._plain_logits(model, xb, tb)
        plan = merge_requests(
            [(explainers[lab].pass_request, explainers[lab].config.get("layer")) for lab in labels]
        )
        start = time.perf_counter()
        try:
            gp = self._call("gradient-pass", lambda: plan.run(model, xb, tb), "thread")
        except Exception as exc:
            # Tell a broken model or bad targets (raised, as without shared methods) from a
            # failed pass (recorded against the methods that needed it).
            logits, tb = self._plain_logits(model, xb, tb)
            for lab in labels:
                fail(lab, exc)
            return logits, tb
        share = (time.perf_counter() - start) / len(labels)
        for lab in labels:
            e = explainers[lab]
            t0 = time.perf_counter()
            try:
                out = self._call(lab, lambda e=e: e.from_pass(gp))
                parts[lab].append(self._validated(lab, e, out, xb))
            except Exception as exc:
                fail(lab, exc)
            seconds[lab] += share + time.perf_counter() - t0
            bar.update(1)
        return gp.logits, gp.targets

    def _plain_logits(self, model, xb, tb) -> tuple[torch.Tensor, torch.Tensor]:
        """The slice's logits and targets from one forward (``tb`` None: the predicted classes;
        targets that do not fit the logits raise, as without shared methods)."""
        if self._state is not None:
            self._state.checked = False  # a forward outside a plugin call: checked at the end
        logits = forward_logits(model, xb, None)
        if tb is None:
            return logits, logits.argmax(1)
        as_target_tensor(tb.cpu(), xb.shape[0], logits.shape[1])
        return logits, tb

    def _call(self, label: str, fn: Any, mode: str | None = None) -> Any:
        """One plugin call: isolated (thread or process, under the time limit), then the model
        checked by content and restored; a call that changed it fails (kind "model")."""
        assert self._state is not None, "plugin calls happen inside Engine.run"
        self._state.checked = False
        try:
            out = call_isolated(fn, self.timeout, label, mode or self._modes.get(label, "thread"))
        except BaseException:
            self._state.restore()
            raise
        restore_or_fail(self._state, label)
        self._state.checked = True  # found unchanged; the next thing that runs on the model clears it
        return out

    @staticmethod
    def _validated(label: str, e: Explainer, out: Any, xb: torch.Tensor) -> tuple[torch.Tensor, dict]:
        attr, extras = out if isinstance(out, tuple) else (out, {})
        attr = check_tensor(label, attr, xb.shape[0])
        if e.space == "input" and tuple(attr.shape) != tuple(xb.shape):
            raise PluginError(
                label, "shape", f"attributions have shape {tuple(attr.shape)}, expected {tuple(xb.shape)}"
            )
        if e.space != "input":
            if attr.dim() == 3:
                attr = attr.unsqueeze(1)
            if attr.dim() != 4 or attr.shape[1] != 1:
                raise PluginError(
                    label, "shape", f"map attributions have shape {tuple(attr.shape)}, expected B x 1 x h x w"
                )
            attr = upsample(attr, spatial_size(xb))
        return attr.detach().float().cpu(), dict(extras or {})

    @staticmethod
    def _assemble(label: str, e: Explainer, chunks, x, targets, seconds) -> Explanation:
        attrs = chunks[0][0] if len(chunks) == 1 else torch.cat([c[0] for c in chunks])
        extras = merge_extras([c[1] for c in chunks], x.shape[0])
        if isinstance(e.config.get("layer"), str):
            extras.setdefault("layer", e.config["layer"])  # the layer actually read (default or given)
        maps = e.to_map(attrs)
        if maps.dim() == 4:
            maps = maps.squeeze(1)
        maps = normalize_maps(upsample(maps, spatial_size(x)))
        check_tensor(label, maps, x.shape[0], "maps")
        return Explanation(
            method=e.name,
            attributions=attrs.contiguous(),
            maps=maps.contiguous(),
            targets=targets.cpu(),
            extras=extras,
            params=dict(e.config),
            seconds=seconds,
        )


def _isolation_mode(request: MethodRequest, isolate: bool | str) -> str:
    """How ``request``'s plugin calls are isolated: its own ``isolate`` parameter, else the run's
    (``Engine.run(isolate="process")``), else in a thread."""
    mode = request.params.get("isolate", isolate if isinstance(isolate, str) else "thread")
    if mode not in ISOLATION_MODES:
        raise XAIError(f"{request.label}: isolate must be one of {', '.join(ISOLATION_MODES)}, got {mode!r}")
    return mode


def merge_extras(chunks: list[dict[str, Any]], total: int) -> dict[str, Any]:
    """Concatenate per-batch extras: batch-first tensors are joined, per-image lists extended,
    dicts merged key by key, anything else (global results) kept from the last batch."""
    if len(chunks) == 1:
        return chunks[0]
    merged: dict[str, Any] = {}
    for key in chunks[0]:
        values: list[Any] = [c.get(key) for c in chunks]
        first = values[0]
        if (
            isinstance(first, torch.Tensor)
            and first.dim() > 0
            and sum(v.shape[0] for v in values if isinstance(v, torch.Tensor)) == total
        ):
            merged[key] = torch.cat([v.detach().cpu() for v in values])
        elif isinstance(first, list) and sum(len(v) for v in values if isinstance(v, list)) == total:
            merged[key] = [item for v in values for item in v]
        elif isinstance(first, dict):
            merged[key] = merge_extras([v for v in values if isinstance(v, dict)], total)
        else:
            merged[key] = values[-1]
    return merged
