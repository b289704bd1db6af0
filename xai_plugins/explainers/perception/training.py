"""Training the PV decoder (Eq. 6-9) with the model frozen; checkpoints, resume, early stopping.

Loss (Eq. 6): ``alpha1 * MSE + alpha2 * (1 - SSIM) + alpha3 * DSIM``, weights summing to one.
Definitional differences from the paper, all of scale only:
- Eq. 7 and Eq. 9 sum over the batch and every element; we take means, so the weights mean the
  same for any image size, latent size and batch size.
- Eq. 8 is ``-sum SSIM_c``; we use ``1 - mean SSIM_c`` (same gradient direction, a loss >= 0).
- With ``normalize_terms`` (default) MSE is divided by the fit data's pixel variance (the MSE of
  its mean image) and DSIM by its mean squared latent: constants that bring each term to about 1
  for a trivial reconstruction, so the alphas weigh the terms as intended whatever the image
  statistics and the scale of the model's activations. (Raw means make MSE ~100x smaller than
  1 - SSIM on natural-looking images, and the paper's sums make it ~1e4x larger: neither balance
  follows from the stated alphas; the authors' code also rescales SSIM by a large constant.)
The encoder of the reconstruction, E(y), is the same frozen model: gradients flow through it to
the decoder, never into the model's parameters.

The checkpoint (after every epoch) holds the decoder, the optimizer, the best weights so far and
the early-stopping counters; the batch order of epoch k is seeded by (seed, k), so an interrupted
run resumed from its checkpoint continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from xai_plugins.explainers.perception.decoder import Decoder
from xai_plugins.explainers.perception.encoder import LatentEncoder
from xai_plugins.explainers.perception.space import ImageSpace
from xai_plugins.explainers.perception.ssim import ssim

CHECKPOINT_FORMAT = "pv-decoder-checkpoint/1"
EpochHook = Callable[[int, dict[str, float]], None]


@dataclass
class TrainConfig:
    alphas: tuple[float, float, float] = (0.2, 0.4, 0.4)
    epochs: int = 20
    patience: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    val_fraction: float = 0.1
    seed: int = 0
    mse_scale: float = 1.0  # MSE divisor (Eq. 7)
    latent_scale: float = 1.0  # DSIM divisor (Eq. 9); see latent_distance
    min_delta: float = 1e-4


@dataclass
class TrainOutcome:
    best_state: dict[str, torch.Tensor]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int = 0


def latent_distance(z_y: torch.Tensor, z: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Per-sample DSIM (Eq. 9): mean squared latent distance, divided by ``scale`` (the mean
    squared latent of the fit data when ``normalize_terms``, else 1)."""
    return (z_y - z).pow(2).flatten(1).mean(1) / max(float(scale), 1e-12)


def pv_loss(
    decoder: Decoder, encoder: LatentEncoder, space: ImageSpace, x: torch.Tensor, cfg: TrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 6 on one batch of model inputs ``x``; returns the loss and its three terms."""
    a1, a2, a3 = cfg.alphas
    with torch.no_grad():
        z = encoder(x)
    target = space.to_image(x)
    y = decoder(z)
    mse = F.mse_loss(y, target) / max(cfg.mse_scale, 1e-12)
    ssim_loss = 1 - ssim(y, target).mean()
    dsim = (
        latent_distance(encoder(space.to_input(y)), z, cfg.latent_scale).mean()
        if a3 > 0
        else torch.zeros((), device=x.device)
    )
    loss = a1 * mse + a2 * ssim_loss + a3 * dsim
    return loss, {
        "loss": float(loss.detach()),
        "mse": float(mse.detach()),
        "ssim": 1 - float(ssim_loss.detach()),
        "dsim": float(dsim.detach()),
    }


def _split(inputs: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_val = int(round(inputs.shape[0] * fraction)) if fraction > 0 else 0
    if n_val < 1 or inputs.shape[0] - n_val < 1:
        return inputs, None
    return inputs[:-n_val], inputs[-n_val:]


def _batches(inputs: torch.Tensor, batch_size: int, seed: int | None) -> Any:
    n = inputs.shape[0]
    order = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        if seed is not None
        else torch.arange(n)
    )
    for start in range(0, n, batch_size):
        yield inputs[order[start : start + batch_size]]


def _evaluate(decoder, encoder, space, inputs, cfg, device) -> dict[str, float]:
    decoder.eval()
    sums: dict[str, float] = {}
    with torch.no_grad():
        for xb in _batches(inputs, cfg.batch_size, None):
            _, parts = pv_loss(decoder, encoder, space, xb.to(device), cfg)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * xb.shape[0]
    return {k: v / inputs.shape[0] for k, v in sums.items()}


def _clone_state(decoder: Decoder) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in decoder.state_dict().items()}


def _load_checkpoint(path: Path | None, decoder: Decoder) -> dict[str, Any] | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a corrupt partial checkpoint: start over
        return None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT or ck.get("arch") != decoder.arch:
        return None
    return ck


def _save_checkpoint(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def train_decoder(
    decoder: Decoder,
    encoder: LatentEncoder,
    space: ImageSpace,
    inputs: torch.Tensor,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    on_epoch_end: EpochHook | None = None,
    device: torch.device | None = None,
) -> TrainOutcome:
    """Train ``decoder`` to invert ``encoder`` on model ``inputs`` (N x C x H x W); resumable."""
    device = device or torch.device("cpu")
    decoder.to(device)
    train, val = _split(inputs, cfg.val_fraction)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    start, best, bad, history = 0, math.inf, 0, []
    best_state = _clone_state(decoder)
    ck = _load_checkpoint(checkpoint, decoder)
    if ck is not None:
        decoder.load_state_dict(ck["decoder"])
        opt.load_state_dict(ck["optimizer"])
        start, best, bad = int(ck["epoch"]), float(ck["best"]), int(ck["bad"])
        best_state, history = ck["best_state"], list(ck["history"])
    outcome = TrainOutcome(best_state, history, resumed_from=start)
    bar = tqdm(
        total=cfg.epochs,
        initial=start,
        desc="PV decoder",
        unit="epoch",
        leave=False,
        disable=os.environ.get("XAI_NO_PROGRESS") == "1",
    )
    try:
        for epoch in range(start, cfg.epochs):
            if bad >= cfg.patience:
                outcome.stopped_early = True
                break
            decoder.train()
            total, n = 0.0, 0
            for xb in _batches(train, cfg.batch_size, cfg.seed * 100_003 + epoch):
                loss, _ = pv_loss(decoder, encoder, space, xb.to(device), cfg)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * xb.shape[0]
                n += xb.shape[0]
            record = {"epoch": epoch + 1, "loss": total / max(1, n)}
            if val is not None:
                record.update(
                    {f"val_{k}": v for k, v in _evaluate(decoder, encoder, space, val, cfg, device).items()}
                )
            score = record.get("val_loss", record["loss"])
            if score < best - cfg.min_delta * abs(best if math.isfinite(best) else 0.0):
                best, bad, best_state = score, 0, _clone_state(decoder)
            else:
                bad += 1
            history.append(record)
            outcome.best_state, outcome.history = best_state, history
            _save_checkpoint(
                checkpoint,
                {
                    "format": CHECKPOINT_FORMAT,
                    "arch": decoder.arch,
                    "epoch": epoch + 1,
                    "best": best,
                    "bad": bad,
                    "decoder": _clone_state(decoder),
                    "optimizer": opt.state_dict(),
                    "best_state": best_state,
                    "history": history,
                },
            )
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{score:.4f}")
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, record)
    finally:
        bar.close()
    decoder.load_state_dict(outcome.best_state)
    decoder.eval()
    return outcome
