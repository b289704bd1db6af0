"""Computation cost of each method (the review's section 7.2: methods compared by computation time).

The engine times every method on the whole batch (a shared forward/backward is split between the
methods that used it); this metric turns that into per-image figures comparable across runs.
"""

from __future__ import annotations

from typing import Any

from xai_plugins import Metric, MetricContext, hookimpl


class Cost(Metric):
    """Wall time of the explanation: ``seconds`` (batch), ``seconds_per_image``, ``images_per_second``."""

    name = "cost"
    higher_is_better = False
    params = {}

    def compute(self, context: MetricContext) -> dict[str, Any]:
        exp = context.explanation
        images = int(exp.maps.shape[0])
        seconds = float(exp.seconds)
        return {
            "seconds": seconds,
            "images": images,
            "seconds_per_image": seconds / max(1, images),
            "images_per_second": images / seconds if seconds > 0 else 0.0,
        }


@hookimpl
def xai_metrics():
    return [Cost]
