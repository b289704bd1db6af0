"""Perturbation explainers against Captum (occlusion, kernel_shap, lime, gradient_shap) and RISE against
a transcription of its authors' reference code (eclique/RISE, ``explanations.py``): same model, inputs,
targets, window / masks / samples. Sizes are chosen so that one call takes a few seconds on this
device; where a peer's batching is tunable, both sides get the fastest of the same candidate batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.harness import Case, quiet, seconds
from core.api import explain

ROWS = 64  # model inputs per forward pass (our batch_size, the peers' internal batches)
BUDGET_S = 3.0  # aim for calls of about this long


def per_input_seconds(model: nn.Module, inputs: torch.Tensor) -> float:
    """Seconds of one no-grad forward per input, measured on a batch of up to 16."""
    x = inputs[:16]
    with torch.no_grad():
        model(x)
        return seconds(lambda: model(x)) / x.shape[0]


def fastest(options: dict[int, Callable[[], Any]]) -> tuple[int, Callable[[], Any]]:
    """The option (keyed by its batch size) that ran fastest in one timed call after a warm-up."""
    if len(options) == 1:
        return next(iter(options.items()))
    timed = {}
    for key, fn in options.items():
        fn()
        timed[key] = seconds(fn)
    best = min(timed, key=timed.get)
    return best, options[best]


class ReferenceRISE:
    """RISE as in the authors' code (eclique/RISE ``explanations.py``): N masks made once with numpy
    and skimage (kept out of the timing, as the code caches them in masks.npy), then per image: the
    masked stack through the model in batches, softmax, and saliency = p^T M / (N p1)."""

    def __init__(
        self,
        model: nn.Module,
        size: tuple[int, int],
        n: int,
        s: int,
        p1: float,
        batch: int,
        device: torch.device,
        seed: int = 0,
    ):
        from skimage.transform import resize

        rng = np.random.default_rng(seed)
        cell = np.ceil(np.array(size) / s)
        up = ((s + 1) * cell).astype(int)
        grid = (rng.random((n, s, s)) < p1).astype("float32")
        masks = np.empty((n, *size), dtype="float32")
        for i in range(n):
            x, y = rng.integers(0, cell[0]), rng.integers(0, cell[1])
            masks[i] = resize(grid[i], up, order=1, mode="reflect", anti_aliasing=False)[
                x : x + size[0], y : y + size[1]
            ]
        self.masks = torch.from_numpy(masks).view(n, 1, *size).to(device)
        self.model, self.n, self.p1, self.batch = model, n, p1, batch

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for x, t in zip(inputs, targets):
                stack = self.masks * x
                p = torch.cat(
                    [self.model(stack[i : i + self.batch]).softmax(1) for i in range(0, self.n, self.batch)]
                )
                sal = p[:, int(t)] @ self.masks.view(self.n, -1)
                out.append(sal.view(*inputs.shape[-2:]) / self.n / self.p1)
        return torch.stack(out)


def cases(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> list[Case]:
    from captum.attr import GradientShap, KernelShap, Lime, Occlusion

    from xai_plugins.explainers.perturbation.segments import slic_segments

    gpu = inputs.device.type == "cuda"
    n = inputs.shape[0] if gpu else 1
    x, t = inputs[:n], targets[:n]
    size = tuple(inputs.shape[-2:])
    cost = per_input_seconds(model, inputs)

    def ours(method: str, rows: int = ROWS, **params: Any) -> Callable[[], Any]:
        return lambda: explain(model, x, t, method=method, progress=False, batch_size=rows, **params)

    # occlusion: the densest window grid that fits the budget (at least 49 windows, as RISE's 128 masks,
    # so that the fixed cost of a call - the engine's forward for the targets - does not dominate)
    geometries = [(16, 8), (16, 16)]
    counts = [(-(-(size[0] - w) // s) + 1) * (-(-(size[1] - w) // s) + 1) for w, s in geometries]
    pick = next((i for i, c in enumerate(counts) if n * c * cost <= BUDGET_S), len(geometries) - 1)
    (window, stride), windows = geometries[pick], counts[pick]
    batches = sorted({ROWS, n * windows})
    occ_rows, occ_ours = fastest({r: ours("occlusion", r, window=window, stride=stride) for r in batches})
    ppe, occ_peer = fastest(
        {
            r: quiet(
                lambda r=r: Occlusion(model).attribute(
                    x,
                    sliding_window_shapes=(3, window, window),
                    strides=(3, stride, stride),
                    target=t,
                    perturbations_per_eval=max(1, r // n),
                )
            )
            for r in batches
        }
    )

    # RISE: as many masks as fit the budget
    samples = int(max(128, min(2000, BUDGET_S / (n * cost)) // 32 * 32))
    reference = ReferenceRISE(model, size, samples, 7, 0.5, ROWS, inputs.device)

    # superpixel methods: the same SLIC segmentation for us and Captum
    segments, _ = slic_segments(x, 50)
    shap_samples = int(max(64, min(512, BUDGET_S / (n * cost)) // 32 * 32))
    mask = segments.unsqueeze(1)
    refs = torch.randn(4, *inputs.shape[1:], generator=torch.Generator().manual_seed(0)).to(inputs.device)
    gs_samples = 16

    return [
        Case(
            "occlusion",
            occ_ours,
            "captum.Occlusion",
            occ_peer,
            note=f"window {window}, stride {stride}: {windows} windows/image; {occ_rows} rows/pass (ours), "
            f"perturbations_per_eval={max(1, ppe // n)} (Captum), each the faster of {batches}",
            batch=n,
        ),
        Case(
            "rise",
            ours("rise", samples=samples, grid=7, keep=0.5),
            "RISE reference code",
            lambda: reference(x, t),
            note=f"{samples} masks, grid 7; reference masks made outside the timing",
            batch=n,
        ),
        Case(
            "kernel_shap",
            ours("kernel_shap", feature_mask=segments, samples=shap_samples),
            "captum.KernelShap",
            quiet(
                lambda: KernelShap(model).attribute(
                    x, target=t, feature_mask=mask, n_samples=shap_samples, perturbations_per_eval=ROWS // n
                )
            ),
            note=f"{shap_samples} coalitions of the same SLIC superpixels",
            batch=n,
        ),
        Case(
            "lime",
            ours("lime", feature_mask=segments, samples=shap_samples, output="logit"),
            "captum.Lime",
            quiet(
                lambda: Lime(model).attribute(
                    x, target=t, feature_mask=mask, n_samples=shap_samples, perturbations_per_eval=ROWS // n
                )
            ),
            note=f"{shap_samples} samples of the same SLIC superpixels; Captum fits a Lasso",
            batch=n,
        ),
        Case(
            "gradient_shap",
            ours("gradient_shap", baseline=refs, samples=gs_samples),
            "captum.GradientShap",
            quiet(lambda: GradientShap(model).attribute(x, baselines=refs, target=t, n_samples=gs_samples)),
            note=f"{gs_samples} samples, 4 references",
            batch=n,
        ),
    ]
