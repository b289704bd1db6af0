"""The review's Table 1 on `shapes`: every method's maps against (synthetic) gaze by SIM and PCC.

    python -m bench.table1                       # reference CNN trained here (or --checkpoint)
    python -m bench.table1 --methods grad_cam,fem --images 32

Gaze comes from ``core.gaze.shapes_gaze`` (an observer who looks mostly at the object, some at
salient clutter) on held-out clean images whose objects may sit anywhere but a thin border
(``make_shapes(placement="anywhere")``): with the training sets' placement, clear of the
watermark corners, every object covers the centre and a centre-bias map is the object prior. Two
reference rows make the numbers readable: ``centre_bias`` (an isotropic Gaussian at the image
centre, the classic saliency baseline) and ``random`` (uniform noise, seeded).
The peer-library bridges (captum_*, gradcam_*) are not built-in methods and are left out.
Methods that need long training (``adversarial_generators``: ~200 s on 16 images here,
``activation_maximization``) run only when named with --methods; a method that fails prints its
one-line reason in place of numbers.
"""

from __future__ import annotations

import argparse
import time

import torch

SLOW = ("adversarial_generators", "activation_maximization", "soft_tree", "perception_visualization")


def centre_bias(n: int, h: int, w: int, sigma: float = 0.25) -> torch.Tensor:
    """An isotropic Gaussian at the centre, ``sigma`` a fraction of the side."""
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    g = torch.exp(-(((yy - h / 2) / (sigma * h)) ** 2 + ((xx - w / 2) / (sigma * w)) ** 2) / 2)
    return g.expand(n, h, w).clone()


def scores(maps: torch.Tensor, density: torch.Tensor) -> dict[str, float]:
    from xai_plugins.similarity import cc, sim

    return {"sim": float(sim(maps, density).mean()), "pcc": float(cc(maps, density).mean())}


def table(
    model: torch.nn.Module, inputs: torch.Tensor, density: torch.Tensor, methods: list[str], seed: int = 0
) -> dict[str, dict[str, float] | str]:
    """Method (and the two baselines) -> {"sim", "pcc", "seconds"}, or the one-line failure."""
    from core.api import explain

    n, h, w = density.shape
    rows: dict[str, dict[str, float] | str] = {
        "centre_bias": scores(centre_bias(n, h, w), density),
        "random": scores(torch.rand(n, h, w, generator=torch.Generator().manual_seed(seed)), density),
    }
    for method in methods:
        start = time.perf_counter()
        try:
            maps = explain(model, inputs, method=method).maps
        except Exception as exc:  # one method's failure is one row
            rows[method] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        rows[method] = {**scores(maps, density), "seconds": time.perf_counter() - start}
    return rows


def format_table(rows: dict[str, dict[str, float] | str]) -> str:
    lines = ["| method | SIM | PCC |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r} | |" if isinstance(r, str) else f"| {name} | {r['sim']:.3f} | {r['pcc']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.table1", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a reference-model checkpoint (default: train the CNN here)")
    p.add_argument("--methods", help="comma-separated methods (default: every built-in but the slow ones)")
    p.add_argument("--images", type=int, default=32, help="held-out shapes images (default 32)")
    p.add_argument("--seed", type=int, default=0, help="gaze and random-map seed")
    a = p.parse_args(argv)
    from core.datasets import make_shapes
    from core.gaze import shapes_gaze
    from core.models import load_model
    from core.plugins import get_host
    from core.train import train_reference

    if a.checkpoint:
        loaded = load_model(a.checkpoint)
        model, preprocess = loaded.model, loaded.preprocess
    else:
        result = train_reference(progress=True)
        model, preprocess = result.model, result.preprocess
    data = make_shapes(a.images, size=32, seed=4242, placement="anywhere")
    gaze = shapes_gaze(data, seed=a.seed)
    host = get_host()
    methods = (
        [m.strip() for m in a.methods.split(",")]
        if a.methods
        else [
            m for m in host.names("explainer") if m not in SLOW and not m.startswith(("captum_", "gradcam_"))
        ]
    )
    print(format_table(table(model, preprocess.normalize(data.images), gaze.density, methods, a.seed)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
