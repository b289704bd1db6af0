"""`xai plugins --check NAME`: run an explainer on a tiny model and input and validate its contract,
so plugin authors know it will work before users find out.

The explainer is called directly (not through the engine, which would repair the model and hide a
leaked hook), then once through the engine to validate what users get.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import XAIError
from core.plugins import get_host


class CheckNet(nn.Module):
    """A tiny CNN with BatchNorm, a residual add, a reused in-place ReLU and a functional ReLU."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x) + x)
        x = F.relu(self.conv3(F.max_pool2d(x, 2)))
        return self.fc(x.mean(dim=(2, 3)))


def _state(model: nn.Module) -> dict[str, Any]:
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "hooks": {
            n: sum(
                len(getattr(m, a))
                for a in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
                if hasattr(m, a)
            )
            for n, m in model.named_modules()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def check_explainer(name: str, params: dict[str, Any] | None = None, seed: int = 0) -> dict[str, Any]:
    """Validate explainer ``name``; returns {"name", "passed", "checks": [{name, passed, detail}]}."""
    host = get_host()
    cls = host.get("explainer", name)
    torch.manual_seed(seed)
    model = CheckNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 16)
    checks: list[dict[str, Any]] = []

    def record(check: str, ok: bool, detail: str) -> None:
        checks.append({"name": check, "passed": bool(ok), "detail": detail})

    try:
        explainer = cls(**(params or {}))
        record("parameters", True, f"defaults: {explainer.config}")
    except Exception as exc:
        record("parameters", False, f"{type(exc).__name__}: {exc}")
        return {"name": name, "passed": False, "checks": checks}
    if "layer" in explainer.config and explainer.config["layer"] is None:
        explainer.config["layer"] = "conv3"
    before = _state(model)
    targets = model(x).argmax(1)
    start = time.perf_counter()
    raw: Any = None
    try:
        if explainer.trainable:
            from core.fitting import FitData

            explainer.checkpoint_path = None
            explainer.load_state(
                explainer.fit(model, FitData(torch.randn(8, 3, 16, 16), torch.arange(8) % 3))
            )
        if explainer.pass_request is not None:
            from core.passes import merge_requests

            plan = merge_requests([(explainer.pass_request, explainer.config.get("layer"))])
            raw = explainer.from_pass(plan.run(model, x, targets))
        else:
            raw = explainer.explain(model, x, targets)
        record("runs", True, f"{time.perf_counter() - start:.2f} s on a 2 x 3 x 16 x 16 batch")
    except Exception as exc:
        record("runs", False, f"raised {type(exc).__name__}: {exc}")
    after = _state(model)
    leaked = {n: c - before["hooks"][n] for n, c in after["hooks"].items() if c != before["hooks"][n]}
    record("hooks removed", not leaked, "none left" if not leaked else f"hooks left on: {', '.join(leaked)}")
    changed = [k for k, v in before["values"].items() if not torch.equal(v, after["values"][k])]
    record(
        "parameters unchanged",
        not changed,
        "unchanged" if not changed else f"changed: {', '.join(changed[:5])}",
    )
    flags = [n for n in before["training"] if before["training"][n] != after["training"][n]]
    grads = [n for n in before["requires_grad"] if before["requires_grad"][n] != after["requires_grad"][n]]
    record(
        "training flag and requires_grad restored",
        not flags and not grads,
        "restored" if not (flags or grads) else f"changed on: {', '.join((flags + grads)[:5])}",
    )
    if raw is not None:
        attr = raw[0] if isinstance(raw, tuple) else raw
        ok_type = isinstance(attr, torch.Tensor)
        if not ok_type:
            record("output shape", False, f"returned {type(attr).__name__}, expected a tensor")
        else:
            if explainer.space == "input":
                ok = tuple(attr.shape) == tuple(x.shape)
                want = f"{tuple(x.shape)} (input space)"
            else:
                ok = (
                    attr.dim() in (3, 4)
                    and attr.shape[0] == x.shape[0]
                    and (attr.dim() == 3 or attr.shape[1] == 1)
                )
                want = "B x 1 x h x w (map space)"
            record("output shape", ok, f"got {tuple(attr.shape)}, expected {want}")
            finite = bool(torch.isfinite(attr).all())
            record("finite values", finite, "no NaN or inf" if finite else "contains NaN or inf")
    try:
        from core.api import explain

        exp = explain(model, x, method=name, progress=False, **(params or {}))
        lo, hi = float(exp.maps.min()), float(exp.maps.max())
        ok = exp.maps.shape == (2, 16, 16) and 0 <= lo <= hi <= 1 and not math.isnan(lo)
        record("maps through the engine", ok, f"maps {tuple(exp.maps.shape)} in [{lo:.3g}, {hi:.3g}]")
    except XAIError as exc:
        record("maps through the engine", False, str(exc))
    except Exception as exc:
        record("maps through the engine", False, f"{type(exc).__name__}: {exc}")
    return {
        "name": name,
        "plugin": host.provider("explainer", name),
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
    }
