"""DeConvolve's succinct-learning ratio (sections 4.2 and 4.4), a model-level metric, per layer.

Section 4.4: "thresholding each feature map from a CNN layer to create binary heat maps ...
identifying high-count positions in the combined matrix ... the calculated ratio, which indicates
the proportion of significant activations relative to the less significant ones" (0.85 before the
explainability loss, 1.00 after it, on CIFAR-10); section 4.2: "processing these positions to
accumulate weights associated with significant activations ... eliminating less relevant
information". The paper's supplementary algorithm is not public; this is the reading we implement,
per image and layer:

1. heat maps M_k = |w_k| * ReLU(A_k) (w_k: the Grad-CAM weight of filter k for the explained class,
   i.e. its impact on the prediction), scaled by the image's largest value; binary heat maps
   B_k = M_k > ``threshold`` (the black cut of the explainability loss, Eq. 1);
2. the combined matrix C = sum_k B_k counts the filters active at each position; high-count
   positions are those with C >= ``min_count``. The default is 2: a position is high-count when at
   least two filters are significant there ("positions with consistently high activations"). With
   ``min_count=1`` every active position would be high-count and this step would do nothing (the
   ratio is then just the share of the weight above the cut);
3. significant activations: the entries with B_k = 1 at high-count positions; the accumulated
   weight of those over the weight of all activations, significant and less significant:
   ratio = sum(M_k * B_k * [C >= min_count]) / sum(M_k), in [0, 1] (1: every bit of the layer's
   class-weighted activation is significant; a layer with no activation counts as 1).

Also reported per layer: ``active_area``, the share of non-black entries (the area term of Eq. 1).

Measured on `shapes` (``python -m bench.succinct --seeds 0,1,2,3,4,5,6,7,8``, README) before the
default became 2, i.e. with ``min_count=1`` (the bench's ``ratio_1``): with the explainability loss
the ratio of the regularized layer rises on 8 of 9 seeds (mean 0.648 -> 0.722);
the exception is the plain run with the broadest maps, where more weight is above the cut because
more of the map is. Other readings of the text (the share of significant weight at positions where
at least half as many filters agree as at the busiest one) fall, because the loss splits the object
across filters (section 3.1) rather than stacking them on one spot; the bench prints them beside the
shipped one.
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Metric, MetricContext, hookimpl
from xai_plugins.toolkit import (
    batch_slices,
    cam_weighted_maps,
    conv_layers,
    preserved_model,
    resolve_layer,
    run_gradient_pass,
)


def succinct_ratio(
    activations: torch.Tensor, gradients: torch.Tensor, threshold: float = 0.1, min_count: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, active area) per image (B each) of one layer's B x K x h x w activations."""
    heat = cam_weighted_maps(activations, gradients)
    active = heat > threshold  # the binary heat maps B_k
    counts = active.sum(dim=1, keepdim=True)  # B x 1 x h x w: the combined matrix
    significant = (heat * (active & (counts >= max(1, int(min_count))))).sum(dim=(1, 2, 3))
    total = heat.sum(dim=(1, 2, 3))
    ratio = torch.where(total > 0, significant / total.clamp_min(1e-12), torch.ones_like(total))
    return ratio, active.float().mean(dim=(1, 2, 3))


class SuccinctLearning(Metric):
    """Succinct-learning ratio and active area per layer (DeConvolve, sections 4.2 / 4.4).

    ``layers``: dotted names (default: every Conv2d, read after a ReLU, as the next layer sees it).
    Keys: ``<layer>.ratio``, ``<layer>.active_area`` and their means over layers, ``ratio`` and
    ``active_area``.
    """

    name = "succinct_learning"
    per_method = False
    higher_is_better = True
    params = {"layers": None, "threshold": 0.1, "min_count": 2, "batch_size": 64}

    def compute(self, context: MetricContext) -> dict[str, Any]:
        model = context.model
        if self.config["layers"]:
            names = [resolve_layer(model, n)[0] for n in self.config["layers"]]
        else:
            names = [n for n, _ in conv_layers(model)]
        if not names:
            raise ValueError("the model has no Conv2d layer; pass layers=")
        sums = {n: torch.zeros(2) for n in names}
        x, t = context.inputs, context.targets
        with preserved_model(model):
            for sl in batch_slices(x.shape[0], int(self.config["batch_size"])):
                gp = run_gradient_pass(model, x[sl], t[sl], names)
                for n in names:
                    ratio, area = succinct_ratio(
                        gp.activations[n],
                        gp.gradients[n],
                        float(self.config["threshold"]),
                        int(self.config["min_count"]),
                    )
                    sums[n] += torch.stack([ratio.sum(), area.sum()]).cpu()
        count = max(1, x.shape[0])
        out: dict[str, Any] = {}
        for n in names:
            out[f"{n}.ratio"] = float(sums[n][0]) / count
            out[f"{n}.active_area"] = float(sums[n][1]) / count
        out["ratio"] = sum(out[f"{n}.ratio"] for n in names) / len(names)
        out["active_area"] = sum(out[f"{n}.active_area"] for n in names) / len(names)
        return out


@hookimpl
def xai_metrics():
    return [SuccinctLearning]
