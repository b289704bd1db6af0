"""The DVC pipeline, with real dvc in temporary git repositories (issue 10).

One workspace with two reproduced versions is built once per module; tests that change it work on
a copy (git, DVC cache and lock file included), so each one starts from the same known state.
Models are untrained DeConvolve CNNs with different seeds (different fingerprints, instant to make);
the probe is 8 `shapes` images, so a stage costs little more than its Python start-up.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from bench.stage_startup import GATE
from core.errors import InputError
from pipelines import layout
from pipelines.api import PipelineError, collect, run_all, run_version
from pipelines.layout import STAGES
from pipelines.params import add_version, read_params, version_key, write_versions
from pipelines.workspace import TEMPLATES, dvc_command, dvc_env, init_workspace

ROOT = Path(__file__).resolve().parent.parent


def dvc(
    ws: Path, *args: str, check: bool = True, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Runs dvc with its output in files, not pipes: `dvc queue start` leaves celery workers behind
    that may inherit the pipes, and reading a pipe to its end then waits for them (a CI run hung
    600 s in `queue start`)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(
            dvc_command(*args), cwd=ws, env=dvc_env(), stdout=out, stderr=err, timeout=timeout
        )
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(done.args, done.returncode, out.read(), err.read())
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def stages_of(key: str, names=STAGES) -> set[str]:
    return {f"{s}@{key}" for s in names}


def edit_params(ws: Path, **changes) -> None:
    params = read_params(ws)
    params.update(changes)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def checkpoint(path: Path, seed: int) -> Path:
    from core.datasets import CLASS_NAMES
    from core.models import build_model, save_checkpoint
    from core.preprocess import Preprocess

    torch.manual_seed(seed)
    return save_checkpoint(
        path,
        build_model("deconvolve_cnn", 4),
        "deconvolve_cnn",
        Preprocess(size=32, mean=[0.5] * 3, std=[0.25] * 3),
        CLASS_NAMES,
        {"seed": seed},
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    out = {f"v{i}": checkpoint(folder / f"cnn-{i}.pt", seed=i) for i in (1, 2, 3)}
    broken = folder / "broken.pt"
    broken.write_bytes(b"this is not a model")
    out["broken"] = broken
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory, models):
    """A workspace made by init_workspace with two versions, reproduced with plain `dvc repro`."""
    ws = tmp_path_factory.mktemp("base") / "ws"
    ws.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=ws, check=True)
    subprocess.run(["git", "config", "user.name", "xai test"], cwd=ws, check=True)
    subprocess.run(["git", "config", "user.email", "xai@example.com"], cwd=ws, check=True)
    done = init_workspace(ws)
    assert done["committed"] and (ws / ".dvc").is_dir()
    params = read_params(ws)
    params["probe"].update(n=8)
    params["metrics"] = {"localization": {}}
    params["gate"] = GATE
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_versions(
        ws,
        [
            {"name": "cnn", "version": 1, "uri": str(models["v1"])},
            {"name": "cnn", "version": "2", "uri": str(models["v2"])},
        ],
    )
    proc = dvc(ws, "repro")
    return ws, proc.stdout


@pytest.fixture
def ws(base, tmp_path) -> Path:
    """A private copy of the base workspace."""
    copy = tmp_path / "ws"
    shutil.copytree(base[0], copy, symlinks=True)
    return copy


def test_repro_runs_every_stage_of_both_versions(base):
    ws, output = base
    assert ran(output) == stages_of("cnn-v1") | stages_of("cnn-v2")
    fingerprints = set()
    for version in ("1", "2"):
        out = ws / layout.RUNS_DIR / "cnn" / version
        for name in (
            layout.MODEL,
            layout.EXPLANATIONS,
            layout.EVALUATION,
            layout.METRICS,
            layout.RESULTS,
            layout.HTML,
            layout.GATE,
            layout.VERDICT,
            "plots/confidence.csv",
        ):
            assert (out / name).is_file(), f"{out / name} missing"
        results = json.loads((out / layout.RESULTS).read_text())
        assert results["meta"]["model"]["name"] == "cnn" and results["meta"]["model"]["version"] == version
        assert set(results["methods"]) == {"saliency", "grad_cam", "lrp"} and len(results["images"]) == 8
        fingerprints.add(json.loads((out / layout.MODEL_INFO).read_text())["fingerprint"])
        assert json.loads((out / layout.GATE).read_text())["passed"] is True
    assert len(fingerprints) == 2
    assert "up to date" in dvc(ws, "status").stdout


def test_metrics_show_lists_gate_and_headline_metrics_per_version(base):
    ws, _ = base
    data = json.loads(dvc(ws, "metrics", "show", "--json").stdout)[""]["data"]
    for version in ("1", "2"):
        gate = data[f"xai-runs/cnn/{version}/gate.json"]["data"]
        assert gate["passed"] is True and gate["status"] == "passed" and gate["checks_failed"] == 0
        metrics = data[f"xai-runs/cnn/{version}/metrics.json"]["data"]
        assert 0.0 <= metrics["saliency"]["localization.pointing_game"] <= 1.0
        assert 0.0 <= metrics["grad_cam"]["localization.relevance_mass"] <= 1.0
        assert metrics["failures"] == 0
    table = dvc(ws, "metrics", "show").stdout
    assert "xai-runs/cnn/1/gate.json" in table and "saliency.localization.pointing_game" in table
    plots = json.loads(dvc(ws, "plots", "show", "--json").stdout)["data"]
    assert {"xai-runs/cnn/1/plots/confidence.csv", "xai-runs/cnn/2/plots/confidence.csv"} <= set(plots)


def test_adding_a_version_runs_only_that_version(ws, models):
    before = {p: p.stat().st_mtime_ns for p in (ws / "xai-runs" / "cnn").rglob("*") if p.is_file()}
    result = run_version(ws, "cnn", "3", uri=str(models["v3"]))
    assert result["stages_run"] == [f"{s}@cnn-v3" for s in STAGES]
    assert Path(result["out_dir"]) == ws / "xai-runs" / "cnn" / "3"
    assert Path(result["results"]).is_file() and Path(result["report"]).is_file()
    assert result["gate"]["passed"] is True and {"passed", "status", "checks"} <= set(result["gate"])
    assert "localization.pointing_game" in result["metrics"]["saliency"]
    after = {p: p.stat().st_mtime_ns for p in before}
    assert after == before  # versions 1 and 2 untouched
    # nothing left to do: a second run of the same version, and the whole pipeline, run nothing
    assert run_version(ws, "cnn", "3")["stages_run"] == []
    code, output = run_all(ws)
    assert code == 0 and ran(output) == set()


def test_method_parameter_reruns_only_dependent_stages(ws):
    edit_params(ws, methods={"saliency": {}, "grad_cam": {"layer": "features.3"}})
    output = dvc(ws, "repro").stdout
    keys = ("cnn-v1", "cnn-v2")
    assert ran(output) == set().union(*(stages_of(k, STAGES[1:]) for k in keys))  # all but resolve
    results = json.loads((ws / "xai-runs/cnn/1" / layout.RESULTS).read_text())
    assert results["methods"]["grad_cam"]["params"]["layer"] == "features.3"
    # the gate policy is read by the gate stage only
    gate = json.loads(json.dumps(GATE))
    gate["checks"][0]["threshold"] = 1.01
    edit_params(ws, gate=gate)
    output = dvc(ws, "repro").stdout
    assert ran(output) == {"gate@cnn-v1", "gate@cnn-v2"}
    assert json.loads((ws / "xai-runs/cnn/2" / layout.GATE).read_text())["passed"] is False


def test_failing_stage_is_named_and_other_versions_stay_intact(ws, models):
    with pytest.raises(PipelineError) as info:
        run_version(ws, "broken", "1", uri=str(models["broken"]))
    assert info.value.stage == "resolve" and info.value.target == "resolve@broken-v1"
    assert "broken.pt" in info.value.message
    for version in ("1", "2"):
        assert (ws / "xai-runs/cnn" / version / layout.HTML).is_file()
    status = dvc(ws, "status", "gate@cnn-v1", "gate@cnn-v2").stdout
    assert "up to date" in status
    # a plain `dvc repro -k` goes on past the broken version and names the failed stage
    code, output = run_all(ws)
    assert code != 0 and "failed to reproduce 'resolve@broken-v1'" in output
    assert collect(ws, "cnn-v1")["gate"]["passed"] is True


def test_queued_experiments_run_versions_in_parallel(ws, models):
    """docs/pipeline.md's recipe: one queued experiment per version, `dvc queue start -j 2`, then a
    `dvc repro` that takes what the experiments computed from DVC's run cache."""
    subprocess.run(["git", "add", "-A"], cwd=ws, check=True)
    subprocess.run(["git", "commit", "-qm", "two versions"], cwd=ws, check=True)
    for version, model in (("3", models["v3"]), ("4", models["v1"])):
        add_version(ws, "cnn", version, uri=str(model))
        dvc(ws, "exp", "run", "--queue", f"gate@cnn-v{version}")
    try:
        dvc(ws, "queue", "start", "-j", "2", timeout=120)
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:
            status = dvc(ws, "queue", "status", timeout=120).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
    finally:
        dvc(ws, "queue", "stop", check=False, timeout=120)
    assert status.count("Success") == 2, status
    output = dvc(ws, "repro").stdout
    assert ran(output) == set(), output  # every stage comes from the run cache
    for stage in STAGES:
        assert f"Stage '{stage}@cnn-v3' is cached" in output and f"Stage '{stage}@cnn-v4' is cached" in output
    assert collect(ws, "cnn-v3")["gate"]["passed"] is True
    assert collect(ws, "cnn-v4")["model"]["fingerprint"] == collect(ws, "cnn-v1")["model"]["fingerprint"]


def test_xai_pipeline_commands_are_registered_through_the_entry_point(base):
    from click.testing import CliRunner

    from core.cli import build_cli

    ws, _ = base
    cli = build_cli()
    assert "pipeline" in cli.commands
    result = CliRunner().invoke(cli, ["pipeline", "status", "-w", str(ws), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [(r["key"], r["gate"], r["up_to_date"]) for r in rows] == [
        ("cnn-v1", "passed", True),
        ("cnn-v2", "passed", True),
    ]


def test_version_names_from_outside_are_validated(tmp_path):
    (tmp_path / "params.yaml").write_text("# kept comment\nmethods: {saliency: {}}\nversions: {}\n")
    for name, version in [
        ("../etc", "1"),
        ("a/b", "1"),
        ("", "1"),
        ("..", "1"),
        ("m", "../1"),
        ("m", "1/2"),
        ("m", True),
        ("m", "1 2"),
        ("-rf", "1"),
        ("m\n", "1"),
        ("m", "1\n"),
    ]:
        with pytest.raises(InputError):
            add_version(tmp_path, name, version)
    assert version_key("my.model", 7) == "my_model-v7"
    keys = write_versions(
        tmp_path, [{"name": "a", "version": 1}, {"name": "b", "version": "2", "uri": "/m.pt"}]
    )
    assert keys == ["a-v1", "b-v2"]
    params = read_params(tmp_path)
    assert params["versions"]["a-v1"] == {"name": "a", "version": "1", "uri": "models:/a/1"}
    assert params["methods"] == {"saliency": {}}
    assert (tmp_path / "params.yaml").read_text().startswith("# kept comment\n")
    write_versions(tmp_path, [{"name": "c", "version": 3}], replace=True)
    assert list(read_params(tmp_path)["versions"]) == ["c-v3"]


def test_workspace_lock_serializes_processes(tmp_path):
    from core.errors import XAIError
    from pipelines.lock import workspace_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from pipelines.lock import workspace_lock
        with workspace_lock({str(tmp_path)!r}):
            print("held", flush=True)
            time.sleep(3)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(XAIError, match="timed out"):
            with workspace_lock(tmp_path, timeout=0.3):
                pass
        with workspace_lock(tmp_path, timeout=30):  # granted once the holder lets go
            with workspace_lock(tmp_path, timeout=0):  # reentrant in one process
                pass
    finally:
        holder.wait(timeout=30)


def test_repository_root_pipeline_is_the_template():
    assert (ROOT / "dvc.yaml").read_text() == (TEMPLATES / "dvc.yaml").read_text()
    root, template = (
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((TEMPLATES / "params.yaml").read_text()),
    )
    assert {k: v for k, v in root.items() if k != "versions"} == {
        k: v for k, v in template.items() if k != "versions"
    }
