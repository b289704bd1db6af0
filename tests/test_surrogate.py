"""soft_tree: a soft decision tree distilled from the reference CNN: fidelity on held-out shapes, the
global explanation (figure, leaves) in the report, per-image paths, stored per model version."""

from __future__ import annotations

import os

import pytest
import torch

from core.api import explain
from core.datasets import make_shapes

PARAMS = {"depth": 3, "fit_epochs": 40}


@pytest.fixture(scope="module")
def fit_dir(tmp_path_factory):
    old = os.environ.get("XAI_FIT_DIR")
    os.environ["XAI_FIT_DIR"] = str(tmp_path_factory.mktemp("fitted"))
    yield os.environ["XAI_FIT_DIR"]
    if old is None:
        os.environ.pop("XAI_FIT_DIR", None)
    else:
        os.environ["XAI_FIT_DIR"] = old


@pytest.fixture(scope="module")
def fitted(trained_cnn, shapes_probe, fit_dir):
    """The tree fitted on 1500 fresh shapes, explaining the 64 held-out probe images."""
    pre = trained_cnn.preprocess
    data = make_shapes(1500, size=32, seed=2024)
    x = pre.normalize(shapes_probe.images)
    exp = explain(
        trained_cnn.model,
        x,
        method="soft_tree",
        fit_data=(pre.normalize(data.images), data.labels),
        class_names=data.class_names,
        **PARAMS,
    )
    return exp, x


def test_fidelity_on_held_out_shapes(trained_cnn, fitted):
    exp, x = fitted
    with torch.no_grad():
        model_pred = trained_cnn.model(x).argmax(1)
    fidelity = float((exp.extras["prediction"] == model_pred).float().mean())
    assert fidelity > 0.8, fidelity
    assert exp.extras["tree"]["fidelity"] > 0.8  # on the 20 % of the fit data it did not train on
    assert exp.extras["tree"]["held_out"] == 300


def test_paths_texts_and_map(fitted):
    exp, x = fitted
    depth = PARAMS["depth"]
    path, dirs = exp.extras["path"], exp.extras["directions"]
    assert path.shape == (64, depth) and (path[:, 0] == 0).all()
    children = 2 * path[:, :-1] + 1 + dirs[:, :-1]
    assert torch.equal(children, path[:, 1:])
    leaf_node = 2 * path[:, -1] + 1 + dirs[:, -1]
    assert torch.equal(leaf_node - (2**depth - 1), exp.extras["leaf"])
    assert len(exp.extras["text"]) == 64 and all("leaf" in s and "node 0" in s for s in exp.extras["text"])
    leaves = torch.tensor(exp.extras["tree"]["leaf_distributions"])
    assert leaves.shape == (2**depth, 4) and torch.allclose(leaves.sum(1), torch.ones(2**depth), atol=1e-3)
    assert exp.maps.shape == (64, 32, 32) and exp.maps.amax(dim=(1, 2)).gt(0).float().mean() > 0.9


def test_report_shows_the_tree(trained_cnn, shapes_probe, fitted, tmp_path):
    from core.workflow import run

    x = trained_cnn.preprocess.normalize(shapes_probe.images[:4])
    results = run(
        trained_cnn.model,
        x,
        {"soft_tree": dict(PARAMS, class_names=shapes_probe.class_names)},
        images=shapes_probe.images[:4],
        metrics=[],
        reporters=["html", "json"],
        out_dir=tmp_path,
        progress=False,
    )
    assert not results.failures, results.failures
    png = results.explanations["soft_tree"].extras["figures"]["tree"]
    assert png.startswith(b"\x89PNG")
    html = (tmp_path / "report.html").read_text()
    assert "soft_tree/tree" in html and html.count("data:image/png") >= 5


def test_state_is_stored_and_reused(trained_cnn, shapes_probe, fitted, fit_dir):
    from pathlib import Path

    exp, x = fitted
    stored = list(Path(fit_dir).rglob("soft_tree-*.pt"))
    assert len(stored) == 1
    again = explain(trained_cnn.model, x[:8], method="soft_tree", **PARAMS)  # no fit data: loads the file
    assert torch.equal(again.extras["path"], exp.extras["path"][:8])
    assert list(Path(fit_dir).rglob("soft_tree-*.pt")) == stored


def test_input_features_render_filters(functional_relu_cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("XAI_FIT_DIR", str(tmp_path))
    torch.manual_seed(0)
    data = torch.randn(40, 3, 16, 16)
    model = functional_relu_cnn
    before = [p.clone() for p in model.parameters()]
    exp = explain(model, data[:3], method="soft_tree", features="input", depth=2, fit_epochs=3, fit_data=data)
    assert exp.extras["figures"]["tree"].startswith(b"\x89PNG")
    assert exp.extras["tree"]["features"] == "input" and exp.extras["path"].shape == (3, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_two_images_fit_on_themselves(functional_relu_cnn, images32, tmp_path, monkeypatch):
    """The smallest batch that can fit (one training row, one held out): a tree, not NaN."""
    monkeypatch.setenv("XAI_FIT_DIR", str(tmp_path))
    exp = explain(functional_relu_cnn, images32[:2], method="soft_tree", fit_epochs=2)
    assert exp.maps.shape == (2, 32, 32) and torch.isfinite(exp.maps).all()
