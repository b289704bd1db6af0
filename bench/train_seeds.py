"""``python -m bench.train_seeds``: held-out accuracy of the reference CNN on `shapes` for each
training seed under one training budget (clean and Clever Hans), to check that a budget converges
on every seed. Floating-point differences between CPUs act like another seed, so a budget whose
every seed converges gives the same model behaviour on any machine.

    python -m bench.train_seeds --seeds 0-9 --watermark none shortcut --threads 1

``--shortcut [METHOD ...]`` also prints each model's ``shortcut.share``, ``share_exact`` and
``pointing`` for those methods (default Grad-CAM) on the watermarked probe of tests/test_policy.py
(48 images, seed 77). The default policy's "not looking at the shortcut" check reads LRP's share
(Grad-CAM's left no margin on every seed). The output shows whether a threshold fits between the
clean and Clever Hans models of every seed with a margin:

    python -m bench.train_seeds --seeds 0-9 --watermark shortcut none --shortcut grad_cam lrp
"""

from __future__ import annotations

import argparse
import time

import torch

from core.train import train_reference


def _seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def watermark_probe():
    """The watermarked probe of the shortcut check: 48 `shapes` images of 32 px, seed 77."""
    from core.datasets import make_shapes

    return make_shapes(48, size=32, seed=77, watermark="agree")


SHORTCUT_METHODS = ("grad_cam",)  # what --shortcut measures when it names no method


def shortcut_run(
    model, preprocess, probe, metrics=("shortcut",), reporters=(), out_dir=None, methods=SHORTCUT_METHODS
):
    """Grad-CAM (or ``methods``) on ``probe`` with its object and watermark masks: the run the
    shortcut check reads."""
    from core.workflow import run

    return run(
        model,
        preprocess.normalize(probe.images),
        list(methods),
        images=probe.images,
        masks=probe.masks,
        spurious_masks=probe.spurious,
        metrics=list(metrics),
        reporters=list(reporters),
        out_dir=out_dir,
        progress=False,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 1,2,4")
    p.add_argument("--watermark", nargs="+", default=["none", "shortcut"])
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 vs 2 also changes the float sums)"
    )
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup", type=float, default=None)
    p.add_argument("--threshold", type=float, default=0.97)
    p.add_argument(
        "--shortcut",
        nargs="*",
        metavar="METHOD",
        help="also print the shortcut metrics of these methods per model (default grad_cam)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    budget = {
        k: v
        for k, v in (
            ("n_train", a.n_train),
            ("epochs", a.epochs),
            ("lr", a.lr),
            ("batch_size", a.batch_size),
            ("warmup", a.warmup),
        )
        if v is not None
    }
    print(f"budget {budget or 'train_reference defaults'}, threads {a.threads}, size {a.size}")
    worst = 1.0
    probe = watermark_probe() if a.shortcut is not None else None
    for wm in a.watermark:
        for seed in _seeds(a.seeds):
            t0 = time.perf_counter()
            r = train_reference(
                "deconvolve_cnn", None, size=a.size, seed=seed, watermark=wm, progress=False, **budget
            )
            curve = " ".join(f"{h['accuracy']:.2f}" for h in r.history)
            share = ""
            if a.shortcut is not None:
                methods = a.shortcut or SHORTCUT_METHODS
                ms = shortcut_run(r.model, r.preprocess, probe, methods=methods).metrics
                share = "".join(
                    f", {name} "
                    + " ".join(f"{k} {m['shortcut.' + k]:.3f}" for k in ("share", "share_exact", "pointing"))
                    for name, m in ms.items()
                )
            print(
                f"{wm:9s} seed {seed}: {r.accuracy:.1%}{share} ({time.perf_counter() - t0:.0f} s) [{curve}]",
                flush=True,
            )
            worst = min(worst, r.accuracy)
    print(f"worst {worst:.1%}: {'all converge' if worst >= a.threshold else 'NOT all converge'}")
    return 0 if worst >= a.threshold else 1


if __name__ == "__main__":
    raise SystemExit(main())
