"""The mission end to end: a version whose gate checks the sanity of its explanations is refused
when one of the gated methods ignores the model. A real local MLflow server, listener, worker and
DVC pipeline (tests/test_registry_loop.py's ``Loop``); the edge detector comes in through a real
``xai`` entry point (a dist-info on the stages' PYTHONPATH), as a third party's plugin would."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_registry_loop import LIGHT_PARAMS, MODEL, NEEDED_PLUGINS, Loop, running_loop, save_loaded

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.timeout(1800)
SANITY_CHECK = "sensitive to cascading randomization"
PARAMS = {
    **LIGHT_PARAMS,
    "methods": {"saliency": {}, "edge_detector": {}},
    "metrics": {
        "sanity": {
            "independent": False,
            "label_randomization": False,
            "similarities": ["spearman"],
            "max_images": 8,
            "figures": False,
        }
    },
    # halfway between the edge detector (1.0: the same map on every randomized model) and the
    # gradient methods (about 0.25-0.4 on the reference CNN): the default gate's threshold
    "gate": {
        "checks": [
            {
                "name": SANITY_CHECK,
                "method": "*",
                "metric": "sanity.cascading.spearman_full",
                "op": "<",
                "threshold": 0.7,
            }
        ]
    },
}


@pytest.fixture(scope="module")
def sanity_loop(tmp_path_factory) -> Iterator[Loop]:
    base = tmp_path_factory.mktemp("sanity-gate")
    site = base / "site"
    info = site / "edge_detector_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edge-detector-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xai]\nedge = edge_detector_plugin\n")
    plugins = NEEDED_PLUGINS | {"sanity"}
    with running_loop(base, PARAMS, plugins=plugins, python_path=(site, HERE)) as lp:
        yield lp


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, trained_cnn) -> Path:
    return save_loaded(tmp_path_factory.mktemp("models") / "clean.pt", trained_cnn)


def test_a_version_gated_on_an_edge_detector_is_refused_on_the_sanity_check(sanity_loop, checkpoint):
    version = sanity_loop.register(checkpoint)
    tags = sanity_loop.wait([version], timeout=1200)[version]
    assert tags["xai.gate"] == "failed", tags
    from registry.gate import version_gate

    state = version_gate(sanity_loop.client, MODEL, version)  # the verdict logged with the version's run
    assert state.status == "failed" and state.exit_code == 1, state
    verdict = state.verdict
    rows = {c["method"]: c for c in verdict["checks"]}
    assert set(rows) == {"saliency", "edge_detector"}, verdict
    assert rows["saliency"]["passed"] and rows["saliency"]["value"] < 0.7, verdict
    assert not rows["edge_detector"]["passed"] and rows["edge_detector"]["value"] > 0.95, verdict
    refused = sanity_loop.xai("promote", MODEL, version, "--alias", "champion")
    assert refused.returncode == 1 and SANITY_CHECK in refused.stderr, refused.stdout + refused.stderr
    shown = sanity_loop.xai("gate", MODEL, version)
    assert shown.returncode == 1 and "edge_detector" in shown.stdout and "FAIL" in shown.stdout, shown.stdout
    assert "champion" not in sanity_loop.client.get_registered_model(MODEL).aliases
