"""Data types shared by the engine, the plugins and the reporters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Explanation:
    """The result of one explainer on one batch (DESIGN.md, public API).

    attributions: float32 CPU tensor, B x C x H x W (input-space methods) or B x 1 x H x W (map
        methods, upsampled to the input, not normalized).
    maps: B x H x W in [0, 1]: what is drawn and what metrics read.
    targets: B long tensor of explained classes.
    extras: method-specific outputs (reconstructions, texts, filter scores, extra images ...).
        ``extras["images"]`` may hold named B x 3 x H x W or B x H x W tensors in [0, 1] that the
        HTML report shows next to the map; ``extras["text"]`` a list of one string per image.
    """

    method: str
    attributions: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    extras: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Failure:
    """A plugin failure recorded against the plugin instead of stopping the run."""

    plugin: str
    name: str
    kind: str  # "exception" | "timeout" | "shape" | "nan" | "input" | ...
    message: str
    stage: str = "explain"  # explain | metric | report | load

    def as_dict(self) -> dict[str, str]:
        return {
            "plugin": self.plugin,
            "name": self.name,
            "kind": self.kind,
            "message": self.message,
            "stage": self.stage,
        }


@dataclass
class RunResults:
    """Everything one run produced: inputs, explanations per method, metrics, failures, timings."""

    inputs: torch.Tensor  # B x C x H x W, normalized for the model
    images: torch.Tensor  # B x 3 x H x W in [0, 1], for display
    targets: torch.Tensor
    predictions: torch.Tensor
    probabilities: torch.Tensor
    labels: torch.Tensor | None = None
    image_names: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    masks: torch.Tensor | None = None  # B x H x W ground-truth object masks, when known
    spurious_masks: torch.Tensor | None = None  # B x H x W known shortcut regions, when known
    explanations: dict[str, Explanation] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> {metric.key: value}
    global_metrics: dict[str, Any] = field(default_factory=dict)  # model-level figures
    figures: dict[str, bytes] = field(default_factory=dict)  # name -> PNG bytes, shown in the report
    failures: list[Failure] = field(default_factory=list)
    skipped_inputs: list[dict[str, str]] = field(default_factory=list)  # bad files: name, reason
    timings: dict[str, float] = field(default_factory=dict)  # method -> seconds (whole batch)
    meta: dict[str, Any] = field(default_factory=dict)

    def failed(self, name: str) -> bool:
        return any(f.name == name for f in self.failures)
