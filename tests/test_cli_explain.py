"""`xai explain` end to end, and every kind of bad input: one clear line, non-zero exit, and the
good images beside a bad one still explained and reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def xai(*args, cwd=ROOT):
    env = {**os.environ, "XAI_NO_PROGRESS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "core.cli", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    r = xai("data", "shapes", "--out", out, "--n", "8", "--seed", "99")
    assert r.returncode == 0, r.stderr
    return out


def _bad_folder(probe: Path, tmp: Path) -> Path:
    folder = tmp / "mixed"
    folder.mkdir()
    good = sorted((probe / "images").rglob("*.png"))[:3]
    for i, g in enumerate(good):
        (folder / f"good_{i}.png").write_bytes(g.read_bytes())
    (folder / "corrupt.png").write_bytes(os.urandom(300))
    data = good[0].read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1)).save(folder / "tiny.png")
    Image.new("L", (32, 32), 128).save(folder / "gray.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(folder / "rgba.png")
    Image.new("1", (9000, 5000)).save(folder / "enormous.png")
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep16.png")  # 16-bit grayscale
    os.symlink(tmp / "nowhere.png", folder / "broken.png")
    return folder


def test_explain_writes_reports_with_metrics(probe, tmp_path, trained_cnn_path):
    out = tmp_path / "out"
    r = xai(
        "explain",
        "--model",
        trained_cnn_path,
        "--images",
        probe / "images",
        "--masks",
        probe / "masks",
        "--methods",
        "saliency,grad_cam",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "pointing game" in r.stdout and "report.html" in r.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["images"]) == 8
    assert set(results["metrics"]) == {"saliency", "grad_cam"}
    assert 0 <= results["metrics"]["grad_cam"]["localization.pointing_game"] <= 1
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 8 * 3 and "<script" not in html
    maps = np.load(out / "maps.npz")
    assert maps["grad_cam"].shape == (8, 32, 32)


def test_bad_images_each_reported_good_ones_kept(probe, tmp_path, trained_cnn_path):
    folder = _bad_folder(probe, tmp_path)
    out = tmp_path / "out"
    r = xai("explain", "--model", trained_cnn_path, "--images", folder, "--methods", "grad_cam", "--out", out)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    for name in (
        "corrupt.png",
        "truncated.png",
        "empty.png",
        "tiny.png",
        "gray.png",
        "rgba.png",
        "enormous.png",
        "deep16.png",
        "broken.png",
    ):
        assert sum(name in ln for ln in lines) == 1, (name, r.stderr)
    assert "Traceback" not in r.stderr and "broken link" in r.stderr
    results = json.loads((out / "results.json").read_text())
    assert sorted(i["name"] for i in results["images"]) == ["good_0.png", "good_1.png", "good_2.png"]
    assert len(results["skipped_inputs"]) == 9
    # --convert accepts grayscale (8- and 16-bit) and RGBA
    r2 = xai(
        "explain",
        "--model",
        trained_cnn_path,
        "--images",
        folder,
        "--methods",
        "grad_cam",
        "--out",
        tmp_path / "out2",
        "--convert",
    )
    names = {i["name"] for i in json.loads((tmp_path / "out2" / "results.json").read_text())["images"]}
    assert {"gray.png", "rgba.png", "deep16.png"} <= names and r2.returncode != 0


def test_sixteen_bit_grayscale_is_scaled_by_its_depth(tmp_path):
    """PIL's own 8-bit conversion clips 16-bit values (almost every pixel white): --convert scales them."""
    from core.images import load_image
    from core.preprocess import Preprocess

    pre = Preprocess(size=32, mean=[0.5] * 3, std=[0.25] * 3)
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    image = load_image(tmp_path / "ramp.png", pre, convert=True)
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])
    assert torch.allclose(image[0], torch.from_numpy(ramp / 65535.0).float(), atol=1e-4)
    Image.fromarray(ramp).resize((48, 40)).save(tmp_path / "big.png")
    resized = load_image(tmp_path / "big.png", pre, convert=True)
    assert resized.shape == (3, 32, 32) and 0.4 < float(resized.mean()) < 0.6


@pytest.mark.parametrize(
    "case",
    [
        "unknown_method",
        "no_images",
        "bad_model",
        "missing_model",
        "bad_output",
        "target_range",
        "pickled_model",
    ],
)
def test_user_mistakes_give_one_line(case, probe, tmp_path, trained_cnn_path):
    images, model, extra = probe / "images", trained_cnn_path, []
    methods = "grad_cam"
    if case == "unknown_method":
        methods = "grad_cam,gradcam_plus"
    elif case == "no_images":
        images = tmp_path / "empty"
        images.mkdir()
        (images / "notes.txt").write_text("x")
    elif case == "bad_model":
        model = tmp_path / "model.pt"
        model.write_bytes(os.urandom(1000))
    elif case == "missing_model":
        model = tmp_path / "nope.pt"
    elif case == "bad_output":
        model = tmp_path / "seg.pt"
        torch.jit.script(torch.nn.Conv2d(3, 2, 3)).save(str(model))
        extra = ["--preprocess", '{"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}']
    elif case == "target_range":
        extra = ["--target", "17"]
    elif case == "pickled_model":
        model = tmp_path / "pickled.pt"
        torch.save(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)), model)
    r = xai(
        "explain", "--model", model, "--images", images, "--methods", methods, "--out", tmp_path / "o", *extra
    )
    assert r.returncode not in (0, None)
    err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), r.stderr
    expected = {
        "unknown_method": "saliency",
        "no_images": "no images",
        "bad_model": "cannot load",
        "missing_model": "does not exist",
        "bad_output": "batch x classes",
        "target_range": "out of range",
        "pickled_model": "--unsafe-load",
    }[case]
    assert expected in err[0]


def test_html_escapes_untrusted_text(tmp_path, trained_cnn):
    from core import workflow

    x = trained_cnn.preprocess.normalize(torch.rand(1, 3, 32, 32))
    res = workflow.run(
        trained_cnn.model,
        x,
        ["grad_cam"],
        image_names=["<script>alert(1)</script>.png"],
        class_names=["<b>c</b>", "x", "y", "z"],
        metrics=[],
        out_dir=tmp_path,
        progress=False,
        meta={"model": {"name": '"><img src=x onerror=alert(1)>'}},
    )
    html = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in html and "onerror=alert(1)>" not in html and "&lt;script&gt;" in html
    assert res.explanations["grad_cam"].maps.shape == (1, 32, 32)


def test_train_with_the_explainability_loss_records_its_recipe(tmp_path):
    """`xai train --explainability-loss` at a token budget: a loadable checkpoint that records the loss
    weights and the optimizer settings; a bad learning rate is one line and exit 2."""
    out = tmp_path / "cnn.pt"
    r = xai(
        "train",
        "--out",
        out,
        "--n-train",
        32,
        "--epochs",
        1,
        "--lr",
        "1e-3",
        "--batch-size",
        16,
        "--explainability-loss",
        "--alpha",
        0.2,
        "--beta",
        0.1,
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "held-out accuracy" in r.stdout
    payload = torch.load(out, weights_only=True)
    info = payload["meta"]
    assert info["explainability_loss"] == {"alpha": 0.2, "beta": 0.1}
    assert info["lr"] == 1e-3 and info["batch_size"] == 16 and info["epochs"] == 1
    bad = xai("train", "--out", tmp_path / "x.pt", "--lr", "0")
    assert bad.returncode == 2 and "--lr" in bad.stderr and not (tmp_path / "x.pt").exists()
