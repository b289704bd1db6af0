"""The two-generator explainer (Charachon et al.) trained with the paper's loss (cross-entropy terms and
a GAN discriminator) and with the margin-hinge variant, same model, data, seed and steps:

    python -m bench.generators               # 400 steps, batch 32, the reference CNN on `shapes`

Printed per variant: keep rate (g_s keeps the prediction), change rate (g_a changes it), the share of
the map's mass on the object mask, the mean |g - x| of each generator and the fit time.
"""

from __future__ import annotations

import argparse
import time

import torch


def run(
    loss: str, steps: int, batch: int, seed: int, model: torch.nn.Module, pre, train, probe
) -> dict[str, float]:
    from core.api import explain

    x = pre.normalize(probe.images)
    with torch.no_grad():
        pred = model(x).argmax(1)
    start = time.perf_counter()
    exp = explain(
        model,
        x,
        method="adversarial_generators",
        fit_data=(pre.normalize(train.images), train.labels),
        fit_steps=steps,
        fit_batch=batch,
        loss=loss,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    maps = exp.maps.flatten(1)
    masks = probe.masks.flatten(1).float()
    on_object = float(((maps * masks).sum(1) / maps.sum(1).clamp_min(1e-12)).mean())
    return {
        "keep": float((exp.extras["similar_prediction"] == pred).float().mean()),
        "change": float((exp.extras["adversarial_prediction"] != pred).float().mean()),
        "map_on_object": on_object,
        "object_area": float(masks.mean()),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    import os
    import tempfile

    from core.datasets import make_shapes
    from core.preprocess import Preprocess
    from core.train import SHAPES_PREPROCESS, train_reference

    p = argparse.ArgumentParser(prog="python -m bench.generators", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="a reference CNN checkpoint (default: train one)")
    a = p.parse_args(argv)
    os.environ.setdefault("XAI_FIT_DIR", tempfile.mkdtemp(prefix="xai-bench-gen-"))
    if a.checkpoint:
        from core.models import load_model

        loaded = load_model(a.checkpoint)
        model, pre = loaded.model.eval(), loaded.preprocess
    else:
        model = train_reference("deconvolve_cnn", None, size=32, seed=a.seed, progress=False).model.eval()
        pre = Preprocess(size=32, **SHAPES_PREPROCESS)
    train, probe = make_shapes(2048, size=32, seed=31), make_shapes(64, size=32, seed=10_000)
    for loss in ("paper", "margin"):
        row = run(loss, a.steps, a.batch, a.seed, model, pre, train, probe)
        print(f"{loss:7s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
