"""A timm ViT version goes through the registry loop (issue 17; README "A timm ViT, explained and
registered"): its checkpoint (timm architecture, timm's preprocessing) is registered in MLflow, the
webhook-driven worker explains it with the transformer methods, gates it on the cascading sanity
check and logs maps, metrics and verdict to one run. Real MLflow server, listener and worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from test_registry_loop import LIGHT_PARAMS, Loop, running_loop

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.timeout(1200)

ARCH = "timm:vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
METHODS = {
    "grad_cam": {},
    "attention_rollout": {"head_fusion": "max", "discard_ratio": 0.9},
    "transformer_attribution": {},
    "lrp": {"composite": "attn_lrp"},
}
# The default policy's cascading-randomization check (policies/default.yaml). On this random-weight
# ViT, cascading spearman_full is -0.16 to 0.24 for the four methods: its threshold of 0.7 passes each
# with a wide margin.
DEFAULT_POLICY = Path(__file__).resolve().parent.parent / "policies" / "default.yaml"
CASCADING = next(
    c
    for c in yaml.safe_load(DEFAULT_POLICY.read_text())["checks"]
    if c["metric"] == "sanity.cascading.spearman_full"
)
VIT_PARAMS = {
    **LIGHT_PARAMS,
    "methods": METHODS,
    "metrics": {
        "localization": {"tolerance": 0},
        "sanity": {"independent": False, "label_randomization": False, "similarities": ["spearman"]},
    },
    "gate": {"checks": [CASCADING]},
}
PLUGINS = {
    "cam",
    "transformer",
    "relevance",
    "localization",
    "sanity",
    "json_reporter",
    "html",
    "registry",
    "pipelines",
}


def vit_checkpoint(path: Path) -> tuple[Path, list[float]]:
    from core.models import save_checkpoint, timm_preprocess

    torch.manual_seed(0)
    model = timm.create_model(ARCH.split(":", 1)[1], pretrained=False, num_classes=4, **KWARGS).eval()
    pre = timm_preprocess(model)
    classes = ["circle", "square", "triangle", "cross"]
    return save_checkpoint(path, model, ARCH, pre, classes, arch_kwargs=KWARGS), list(pre.mean)


@pytest.fixture(scope="module")
def vit_loop(tmp_path_factory) -> Iterator[Loop]:
    base = tmp_path_factory.mktemp("registry-vit")
    with running_loop(base, VIT_PARAMS, "shapes-vit", PLUGINS) as lp:
        yield lp


def test_a_timm_vit_version_is_explained_gated_and_logged(vit_loop, tmp_path):
    checkpoint, timm_mean = vit_checkpoint(tmp_path / "vit.pt")
    version = vit_loop.register(checkpoint)
    tags = vit_loop.wait([version], timeout=900)[version]
    assert tags["xai.status"] == "done" and tags["xai.gate"] == "passed", tags
    [run] = vit_loop.runs_of(version)
    assert run.data.tags["xai.gate"] == "passed"
    for method in METHODS:  # every transformer method explained all 8 probe images, none refused
        maps = vit_loop.client.list_artifacts(run.info.run_id, f"maps/{method}")
        assert len(maps) == 8 and all(a.path.endswith(".png") for a in maps), method
        assert run.data.metrics[f"{method}/sanity.cascading.spearman_full"] < CASCADING["threshold"]
    local = Path(vit_loop.client.download_artifacts(run.info.run_id, "results.json", str(tmp_path)))
    results = json.loads(local.read_text())
    assert results["failures"] == [], results["failures"]
    assert set(results["methods"]) == set(METHODS)
    info = vit_loop.client.download_artifacts(run.info.run_id, "pipeline/model.json", str(tmp_path))
    model = json.loads(Path(info).read_text())  # timm's architecture and its own preprocessing
    assert model["arch"] == ARCH and model["preprocess"]["mean"] == pytest.approx(timm_mean)
