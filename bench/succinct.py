"""DeConvolve's explainability loss (Eq. 1) on `shapes`: accuracy, active area, dispersion and several
readings of the succinct-learning ratio, with and without the loss, same seed and data.

    python -m bench.succinct --seeds 0,1,2            # the reference budget: 3000 images, 10 epochs
    python -m bench.succinct --train 600 --epochs 3   # the test suite's budget

The paper (sections 4.2 / 4.4) reports the ratio rising from 0.85 to 1.00 with the loss; its
algorithm is in unpublished supplementary material. This prints every reading side by side so the
next change to ``xai_plugins/metrics/deconvolve_metrics.py`` can be checked against measurements:

- ``ratio``: the metric as shipped (share of CAM-weighted activation at high-count positions of the
  combined binary maps);
- ``mass_above_cut``: share of CAM-weighted activation above the loss's black threshold;
- ``filter_mass_above_cut``: the same per filter, each scaled by its own peak;
- ``sign_agreement``: |sum_k w_k A_k| / sum_k |w_k| A_k (1: no filter conflicts at any position);
- ``main_spot_share``: per filter, share of its above-threshold activation in its largest spot.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy import ndimage


def readings(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, layer: str = "features",
             threshold: float = 0.1) -> dict[str, float]:
    from core.explainability_loss import cam_weighted_maps
    from xai_plugins.metrics.deconvolve_metrics import succinct_ratio
    from xai_plugins.toolkit import run_gradient_pass

    gp = run_gradient_pass(model, x, labels, [layer])
    a, g = gp.activations[layer], gp.gradients[layer]
    w = g.mean((2, 3), keepdim=True)
    pos = a.clamp(min=0)
    heat = cam_weighted_maps(a, g)
    active = heat > threshold
    peak = pos.amax((2, 3), keepdim=True)
    live = peak.flatten(1) > 0
    own = ((pos * (pos > threshold * peak)).sum((2, 3)) / pos.sum((2, 3)).clamp_min(1e-12))[live]
    signed, unsigned = (w * pos).sum(1), (w.abs() * pos).sum(1)
    spot = total = 0.0
    act, hm = active.numpy(), heat.numpy()
    for i in range(act.shape[0]):
        for k in range(act.shape[1]):
            if act[i, k].any():
                lab, n = ndimage.label(act[i, k])
                mass = ndimage.sum(hm[i, k], lab, index=np.arange(1, n + 1))
                spot, total = spot + float(np.max(mass)), total + float(np.sum(mass))
    ratio, area = succinct_ratio(a, g, threshold)
    return {"ratio": float(ratio.mean()), "active_area": float(area.mean()),
            "mass_above_cut": float(((heat * active).sum((1, 2, 3)) / heat.sum((1, 2, 3)).clamp_min(1e-12)).mean()),
            "filter_mass_above_cut": float(own.mean()),
            "sign_agreement": float((signed.abs().sum((1, 2)) / unsigned.sum((1, 2)).clamp_min(1e-12)).mean()),
            "main_spot_share": spot / max(total, 1e-12)}


def main(argv: list[str] | None = None) -> int:
    from core.datasets import make_shapes
    from core.explainability_loss import ExplainabilityLoss, focus_stats
    from core.preprocess import Preprocess
    from core.train import SHAPES_PREPROCESS, train_reference

    p = argparse.ArgumentParser(prog="python -m bench.succinct", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--train", type=int, default=3000, help="training images (default 3000)")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args(argv)
    pre = Preprocess(size=32, **SHAPES_PREPROCESS)
    test = make_shapes(400, size=32, seed=10_000)
    x = pre.normalize(test.images)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for seed in [int(s) for s in a.seeds.split(",") if s.strip()]:
        for name, extra in (("without", None), ("with", ExplainabilityLoss(alpha=a.alpha, beta=a.beta))):
            start = time.perf_counter()
            result = train_reference("deconvolve_cnn", None, size=32, n_train=a.train, epochs=a.epochs, seed=seed,
                                     extra_loss=extra, progress=False)
            model = result.model.eval()
            row = {"accuracy": result.accuracy, **focus_stats(model, x, test.labels, layer="features"),
                   **readings(model, x, test.labels), "seconds": time.perf_counter() - start}
            results.setdefault(f"seed {seed}", {})[name] = row
            print(f"seed {seed} {name:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
