"""RISE: randomized input sampling for explanation (Petsiuk et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xai_plugins import Explainer, InputError
from xai_plugins.toolkit import resolve_baseline

from .common import generator, masked_scores


class RandomMasks:
    """The N random masks of RISE (section 3.2), made on demand in chunks so N x H x W never has to
    sit in memory (they are cached when they fit in ``CACHE_ELEMENTS`` floats): an s x s binary grid (cells kept with probability p), bilinearly upsampled to
    (s + 1) * ceil(H / s) and cropped at a random shift in [0, cell) along each axis."""

    CACHE_ELEMENTS = 2**25

    def __init__(
        self,
        count: int,
        grid: int,
        keep: float,
        size: tuple[int, int],
        gen: torch.Generator,
        device: torch.device,
    ):
        height, width = size
        self.size = size
        self.cell = (-(-height // grid), -(-width // grid))
        self.up = ((grid + 1) * self.cell[0], (grid + 1) * self.cell[1])
        self.grid = (torch.rand(count, 1, grid, grid, generator=gen, device=device) < keep).float()
        self.shift_y = torch.randint(0, self.cell[0], (count,), generator=gen, device=device)
        self.shift_x = torch.randint(0, self.cell[1], (count,), generator=gen, device=device)
        self.cache: torch.Tensor | None = None
        if count * height * width <= self.CACHE_ELEMENTS:
            self.cache = torch.cat([self.make(k) for k in torch.arange(count, device=device).split(256)])

    def __len__(self) -> int:
        return self.grid.shape[0]

    def __call__(self, k: torch.Tensor) -> torch.Tensor:
        """Masks ``k`` (n x 1 x H x W, values in [0, 1])."""
        return self.make(k) if self.cache is None else self.cache[k]

    def make(self, k: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(self.grid[k], size=self.up, mode="bilinear", align_corners=False)[:, 0]
        ar_y = torch.arange(self.size[0], device=k.device)
        ar_x = torch.arange(self.size[1], device=k.device)
        ys = (self.shift_y[k].view(-1, 1) + ar_y).unsqueeze(2)
        xs = (self.shift_x[k].view(-1, 1) + ar_x).unsqueeze(1)
        rows = torch.arange(k.numel(), device=k.device).view(-1, 1, 1)
        return up[rows, ys, xs].unsqueeze(1)


class RISE(Explainer):
    """RISE (Petsiuk et al. 2018, Eq. 6): S_c(x) ~= 1 / (N * p) * sum_i f_c(x . M_i) M_i over N random
    masks M_i with E[M] = p.

    Masked pixels take the ``baseline`` value (zeros in normalized input space by default; the paper
    multiplies the raw image by the mask, i.e. a black baseline). Scores are the target's softmax
    probability (``output="probability"``, as the paper) or its logit. Masks are shared by all images;
    ``samples`` = N, ``grid`` = s, ``keep`` = p; mask upsampling is torch's bilinear
    (align_corners=False) where the reference code uses skimage's ``resize(order=1, mode="reflect")``.
    """

    name = "rise"
    space = "map"
    params = {
        "samples": 2000,
        "grid": 7,
        "keep": 0.5,
        "baseline": "zeros",
        "output": "probability",
        "seed": 0,
        "batch_size": 64,
    }

    def explain(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if not 0 < cfg["keep"] < 1 or cfg["samples"] < 1 or cfg["grid"] < 1:
            raise InputError("rise needs 0 < keep < 1, samples >= 1 and grid >= 1")
        size = (inputs.shape[-2], inputs.shape[-1])
        masks = RandomMasks(
            cfg["samples"],
            cfg["grid"],
            cfg["keep"],
            size,
            generator(cfg["seed"], inputs.device),
            inputs.device,
        )
        baseline = resolve_baseline(cfg["baseline"], inputs)
        scores = masked_scores(
            model,
            inputs,
            baseline,
            targets,
            len(masks),
            lambda b, k: masks(k),
            cfg["batch_size"],
            cfg["output"],
        )
        saliency = torch.zeros(inputs.shape[0], size[0] * size[1], device=inputs.device)
        step = max(1, cfg["batch_size"] or len(masks))
        for start in range(0, len(masks), step):
            k = torch.arange(start, min(len(masks), start + step), device=inputs.device)
            saliency += scores[:, k] @ masks(k).view(k.numel(), -1)
        return (saliency / (len(masks) * cfg["keep"])).view(-1, 1, *size)
