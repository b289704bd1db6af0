"""What each stage process imports (issue 19): a stage loads only the libraries its work needs.

Each check runs a real stage (or entry) in a fresh interpreter and reads ``sys.modules`` at its end:
deterministic, not a timing test. The bridges' libraries (captum, pytorch-grad-cam, and through it
torchvision, scikit-learn, pandas, OpenCV) cost about 4 s per process; a stage whose methods are
native must not pay for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.stage_startup import STAGES, make_workspace

ROOT = Path(__file__).resolve().parent.parent
BRIDGE_LIBS = ("captum", "pytorch_grad_cam", "torchvision", "sklearn", "pandas", "cv2")
MLOPS = ("mlflow", "dvc", "ray")
NOT_NEEDED = {stage: BRIDGE_LIBS + MLOPS for stage in STAGES}
WATCHED = sorted({m for mods in NOT_NEEDED.values() for m in mods})


def loaded_after(code: str, cwd: Path = ROOT) -> set[str]:
    """The WATCHED top-level modules in sys.modules after ``code`` ran in a fresh interpreter."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {WATCHED!r} if m in sys.modules]))"
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "XAI_NO_PROGRESS": "1", "XAI_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("startup") / "ws"
    return folder, make_workspace(folder)


def test_each_stage_imports_only_what_it_needs(workspace):
    """The five stages in order (each reads the one before), each in its own process."""
    folder, key = workspace
    for stage in STAGES:
        run = f"from pipelines.stages import main\nassert main([{stage!r}, '--key', {key!r}]) == 0"
        extra = loaded_after(run, cwd=folder) & set(NOT_NEEDED[stage])
        assert not extra, f"stage {stage} imported {sorted(extra)}"


def test_stage_module_and_cli_entry_import_no_heavy_library():
    """``python -m pipelines.stages`` before a stage runs, and the ``xai`` root with every plugin's
    commands added (what ``xai --help`` builds)."""
    assert not loaded_after("import pipelines.stages")
    assert not loaded_after("from core.cli import build_cli\nbuild_cli()")


def test_bridge_methods_still_load_on_demand():
    """Asking for a bridge method imports its library then, and only that library."""
    got = loaded_after(
        "from core.plugins import get_host\nh = get_host()\n"
        "assert h.get('explainer', 'saliency') and h.get('explainer', 'captum_saliency')"
    )
    assert "captum" in got and "pytorch_grad_cam" not in got
