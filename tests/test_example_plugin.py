"""Installing the example distribution with pip makes its explainer and metric appear and run;
uninstalling removes them. Also: `xai plugins --check` catches broken plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.params import read_params, write_versions
from pipelines.workspace import dvc_command, dvc_env, init_workspace

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "xai-plugin-example"


def run(*args, env=None):
    return subprocess.run(
        [*map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XAI_NO_PROGRESS": "1", **(env or {})},
    )


def xai(*args, env=None):
    return run(sys.executable, "-m", "core.cli", *args, env=env)


@pytest.fixture
def installed_example():
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    r = run(*pip, str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    try:
        yield
    finally:
        run(sys.executable, "-m", "pip", "uninstall", "-q", "-y", "xai-plugin-example")


def test_example_installs_runs_and_uninstalls(installed_example, tmp_path, trained_cnn_path):
    listing = xai("plugins", "--json")
    infos = {i["name"]: i for i in json.loads(listing.stdout)}
    assert infos["example"]["distribution"] == "xai-plugin-example"
    assert infos["example"]["provides"] == {"explainer": ["input_x_gradient"], "metric": ["map_entropy"]}
    check = xai("plugins", "--check", "input_x_gradient")
    assert check.returncode == 0, check.stdout
    xai("data", "shapes", "--out", tmp_path / "probe", "--n", "4")
    out = tmp_path / "out"
    r = xai(
        "explain",
        "--model",
        trained_cnn_path,
        "--images",
        tmp_path / "probe" / "images",
        "--methods",
        "input_x_gradient,grad_cam",
        "--metrics",
        "map_entropy",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"]["input_x_gradient"]["map_entropy.entropy"] > 0
    # ... and in the DVC pipeline, by name in params.yaml like any built-in
    ws = tmp_path / "ws"
    ws.mkdir()
    init_workspace(ws)
    params = read_params(ws)
    params["probe"].update(n=4)
    params.update(methods={"input_x_gradient": {}}, metrics={"map_entropy": {}}, gate={"checks": []})
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_versions(ws, [{"name": "cnn", "version": 1, "uri": str(trained_cnn_path)}])
    repro = subprocess.run(dvc_command("repro"), cwd=ws, env=dvc_env(), capture_output=True, text=True)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    piped = json.loads((ws / "xai-runs" / "cnn" / "1" / "metrics.json").read_text())
    assert piped["input_x_gradient"]["map_entropy.entropy"] > 0
    own_tests = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests"))
    assert own_tests.returncode == 0, own_tests.stdout
    run(sys.executable, "-m", "pip", "uninstall", "-q", "-y", "xai-plugin-example")
    after = xai("plugins", "--json")
    assert "example" not in {i["name"] for i in json.loads(after.stdout)}


BROKEN = """
import torch
from xai_plugins import Explainer, hookimpl


class LeavesHook(Explainer):
    name = "leaves_hook"
    space = "map"

    def explain(self, model, inputs, targets):
        list(model.modules())[1].register_forward_hook(lambda *a: None)
        return inputs[:, :1]


class WrongShape(Explainer):
    name = "wrong_shape"

    def explain(self, model, inputs, targets):
        return inputs[:, :, :4]


class Fine(Explainer):
    name = "fine"
    space = "map"

    def explain(self, model, inputs, targets):
        return inputs.abs().sum(1, keepdim=True)


@hookimpl
def xai_explainers():
    return [LeavesHook, WrongShape, Fine]
"""


@pytest.mark.parametrize(
    "name,failing", [("leaves_hook", "hooks removed"), ("wrong_shape", "output shape"), ("fine", None)]
)
def test_plugin_check_catches_contract_breaks(tmp_path, name, failing):
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_plugin.py").write_text(BROKEN)
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xai]\nbroken = broken_plugin\n")
    r = xai("plugins", "--check", name, "--json", env={"PYTHONPATH": str(site)})
    report = json.loads(r.stdout)
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    if failing is None:
        assert r.returncode == 0 and not failed
    else:
        assert r.returncode == 1 and failing in failed, report
