"""Faithfulness by perturbation: remove what the map calls relevant and watch the output fall.

- Region perturbation / pixel flipping with AOPC (Samek et al. 2017, Eq. 12; the review's
  section 7.1): regions of ``window`` x ``window`` pixels, most relevant first (MoRF) by the map's
  mean over the region, are replaced step by step (``steps`` steps over the whole image; AOPC uses
  the steps up to ``max_fraction`` of the regions):
  AOPC = 1/(L+1) < sum_{k=0..L} f(x^(0)) - f(x^(k)) > over images. Higher = more faithful.
- Deletion and insertion curves (Petsiuk et al. 2018, RISE): the score of the target class while
  the most relevant regions are deleted (replaced by the baseline) or inserted into an empty canvas
  (a blurred copy, as Petsiuk et al.), from 0 to 100 % of the image; the areas under the curves
  (trapezoid over the fraction) are ``deletion_auc`` (lower is better) and ``insertion_auc``
  (higher is better).

Each figure comes with the same procedure under random region orders (``*_random``, averaged
over ``random_runs`` seeded orders), so "beats random" is measurable: ``aopc_gain = aopc -
aopc_random``. ``f`` is the softmax probability of the explained class (``score="logit"``: the
logit). Differences from Samek et al.: regions are a fixed grid rather than centred on each most
relevant pixel, and the default replacement is the baseline (zeros, as Captum) instead of uniform
noise (``baseline="uniform"`` gives Samek's).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins import Metric, MetricContext, hookimpl
from xai_plugins.metrics.plots import line_plot
from xai_plugins.toolkit import batch_slices, preserved_model, resolve_baseline, select_targets

BASELINES = ("zeros", "mean", "blur", "uniform")


def region_ranks(maps: torch.Tensor, window: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """B x Rh x Rw rank of every region (0 = perturbed first) by decreasing mean relevance of the
    map over the region; ties in random order (drawn from ``generator``)."""
    pooled = F.avg_pool2d(maps.float().unsqueeze(1), window, stride=window, ceil_mode=True).squeeze(1)
    b, rh, rw = pooled.shape
    flat = pooled.reshape(b, -1)
    g = generator or torch.Generator().manual_seed(0)
    shuffle = torch.stack([torch.randperm(flat.shape[1], generator=g) for _ in range(b)])
    order = shuffle.gather(1, torch.argsort(flat.gather(1, shuffle), dim=1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1]).expand(b, -1).contiguous())
    return ranks.reshape(b, rh, rw)


def random_ranks(shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """B x Rh x Rw random region ranks (the random-order baseline)."""
    b, rh, rw = shape
    return torch.stack([torch.randperm(rh * rw, generator=generator) for _ in range(b)]).reshape(b, rh, rw)


def _pixel_ranks(ranks: torch.Tensor, window: int, size: tuple[int, int]) -> torch.Tensor:
    up = ranks.repeat_interleave(window, dim=1).repeat_interleave(window, dim=2)
    return up[:, : size[0], : size[1]]


def baseline_fill(inputs: torch.Tensor, kind: str, window: int, seed: int = 0) -> torch.Tensor:
    """What a removed region becomes: ``zeros``, the image's per-channel ``mean``, a ``blur``red
    copy (box filter of twice the window), or ``uniform`` noise in the batch's per-channel range."""
    if kind in ("zeros", "mean"):  # the references every method shares
        return resolve_baseline(kind, inputs).expand_as(inputs).clone()
    if kind == "blur":
        k = 2 * window + 1
        padded = F.pad(inputs, (k // 2,) * 4, mode="replicate")
        return F.avg_pool2d(padded, k, stride=1)
    if kind == "uniform":
        lo = inputs.amin(dim=(0, 2, 3), keepdim=True)
        hi = inputs.amax(dim=(0, 2, 3), keepdim=True)
        g = torch.Generator(device="cpu").manual_seed(seed)
        return (lo + (hi - lo) * torch.rand(inputs.shape, generator=g).to(inputs.device)).to(inputs.dtype)
    raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def perturbation_curve(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ranks: torch.Tensor,
    window: int,
    fractions: list[float],
    start: torch.Tensor,
    end: torch.Tensor,
    score: str = "probability",
    batch_size: int = 256,
) -> torch.Tensor:
    """B x len(fractions) scores of the target class: at fraction q, the first round(q * R) regions
    (by ``ranks``) show ``end`` and the others ``start`` (deletion: start = input, end = baseline;
    insertion: the reverse). Runs every step of every image batched, without gradients."""
    b = inputs.shape[0]
    n_regions = ranks[0].numel()
    pix = _pixel_ranks(ranks.to(inputs.device), window, tuple(inputs.shape[-2:])).unsqueeze(1)
    counts = [int(round(q * n_regions)) for q in fractions]
    scores = torch.empty(b, len(counts))
    jobs = [(i, k) for k in range(len(counts)) for i in range(b)]
    with preserved_model(model), torch.no_grad():
        for sl in batch_slices(len(jobs), batch_size):
            idx = torch.tensor([jobs[j][0] for j in range(sl.start, sl.stop)], device=inputs.device)
            ks = torch.tensor([counts[jobs[j][1]] for j in range(sl.start, sl.stop)], device=inputs.device)
            mask = (pix[idx] < ks.view(-1, 1, 1, 1)).to(inputs.dtype)
            x = start[idx] * (1 - mask) + end[idx] * mask
            logits = model(x).float()
            values = F.softmax(logits, dim=1) if score == "probability" else logits
            steps = torch.tensor([jobs[j][1] for j in range(sl.start, sl.stop)])
            scores[idx.cpu(), steps] = select_targets(values, targets[idx]).cpu()
    return scores


def aopc(scores: torch.Tensor) -> torch.Tensor:
    """Per image: 1/(L+1) sum_k (f(x^(0)) - f(x^(k))) (Samek et al. 2017, Eq. 12)."""
    return (scores[:, :1] - scores).mean(dim=1)


def area(fractions: list[float], scores: torch.Tensor) -> torch.Tensor:
    """Per image: trapezoid area under the curve over the fraction axis."""
    return torch.trapezoid(scores, torch.tensor(fractions, dtype=scores.dtype), dim=1)


class Faithfulness(Metric):
    """AOPC (MoRF region perturbation) and deletion / insertion areas, each against a random
    region order: ``aopc``, ``aopc_random``, ``aopc_gain``, ``deletion_auc(_random)``,
    ``insertion_auc(_random)``, and the mean curves over ``fractions``."""

    name = "faithfulness"
    higher_is_better = True
    params = {
        "window": None,
        "steps": 16,
        "max_fraction": 0.5,
        "baseline": "zeros",
        "insertion_baseline": "blur",
        "score": "probability",
        "random_runs": 2,
        "seed": 0,
        "batch_size": 256,
        "max_images": 32,
        "figures": True,
    }

    def compute(self, context: MetricContext) -> dict[str, Any]:
        cfg = self.config
        n = min(int(cfg["max_images"]), context.inputs.shape[0])
        x, t = context.inputs[:n], context.targets[:n]
        maps = context.explanation.maps[:n].to(x.device)
        window = int(cfg["window"] or max(1, min(x.shape[-2:]) // 8))
        steps = int(cfg["steps"])
        g = torch.Generator().manual_seed(int(cfg["seed"]))
        ranks = region_ranks(maps.cpu(), window, g)
        randoms = [random_ranks(tuple(ranks.shape), g) for _ in range(int(cfg["random_runs"]))]
        removed = baseline_fill(x, cfg["baseline"], window, int(cfg["seed"]))
        canvas = baseline_fill(x, cfg["insertion_baseline"], window, int(cfg["seed"]))
        fr_full = [k / steps for k in range(steps + 1)]
        last = max(1, sum(1 for q in fr_full if q <= float(cfg["max_fraction"]) + 1e-9))
        fr_aopc = fr_full[:last]  # AOPC: the first L+1 steps of the deletion (MoRF) curve

        def curves(order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            run = dict(window=window, score=cfg["score"], batch_size=int(cfg["batch_size"]))
            dele = perturbation_curve(
                context.model, x, t, order, fractions=fr_full, start=x, end=removed, **run
            )
            ins = perturbation_curve(
                context.model, x, t, order, fractions=fr_full, start=canvas, end=x, **run
            )
            return dele, ins

        dele, ins = curves(ranks)
        rnd = [curves(r) for r in randoms]
        r_dele, r_ins = (torch.stack([c[i] for c in rnd]).mean(0) for i in range(2))
        morf, r_morf = dele[:, :last], r_dele[:, :last]
        out: dict[str, Any] = {
            "aopc": float(aopc(morf).mean()),
            "aopc_random": float(aopc(r_morf).mean()),
            "deletion_auc": float(area(fr_full, dele).mean()),
            "deletion_auc_random": float(area(fr_full, r_dele).mean()),
            "insertion_auc": float(area(fr_full, ins).mean()),
            "insertion_auc_random": float(area(fr_full, r_ins).mean()),
            "fractions": fr_full,
            "aopc_fractions": fr_aopc,
            "aopc_curve": (morf[:, :1] - morf).mean(0).tolist(),
            "aopc_curve_random": (r_morf[:, :1] - r_morf).mean(0).tolist(),
            "deletion_curve": dele.mean(0).tolist(),
            "deletion_curve_random": r_dele.mean(0).tolist(),
            "insertion_curve": ins.mean(0).tolist(),
            "insertion_curve_random": r_ins.mean(0).tolist(),
            "window": window,
            "images": n,
        }
        out["aopc_gain"] = out["aopc"] - out["aopc_random"]
        out["aopc_beats_random"] = float((aopc(morf) > aopc(r_morf)).float().mean())
        if cfg["figures"]:
            out["_figures"] = self._figures(context.explanation.method, out)
        return out

    def _figures(self, method: str, out: dict[str, Any]) -> dict[str, bytes]:
        ylabel = "probability of the class" if self.config["score"] == "probability" else "logit of the class"
        styles = {
            "deletion": "-o",
            "deletion (random order)": "--",
            "insertion": "-s",
            "insertion (random order)": ":",
        }
        di = line_plot(
            out["fractions"],
            {
                "deletion": out["deletion_curve"],
                "deletion (random order)": out["deletion_curve_random"],
                "insertion": out["insertion_curve"],
                "insertion (random order)": out["insertion_curve_random"],
            },
            f"{method}: deletion (AUC {out['deletion_auc']:.3f}) / insertion (AUC {out['insertion_auc']:.3f})",
            ylabel,
            "fraction of the image changed",
            styles=styles,
        )
        ap = line_plot(
            out["aopc_fractions"],
            {"most relevant first": out["aopc_curve"], "random order": out["aopc_curve_random"]},
            f"{method}: AOPC {out['aopc']:.3f} vs random {out['aopc_random']:.3f}",
            "drop of the score",
            "fraction of regions perturbed",
        )
        return {"deletion_insertion": di, "aopc": ap}


@hookimpl
def xai_metrics():
    return [Faithfulness]
