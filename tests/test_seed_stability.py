"""The assertions on trained reference CNNs hold for every one of five training seeds.

Another CPU's floating-point sums give another model, much as another training seed does, so each
test below that reads the behaviour of the trained CNNs (accuracy, localization, faithfulness
against the random order, the shortcut gate, fidelity, robustness, sanity) runs again in a child
pytest with ``XAI_TEST_MODEL_SEED`` set to seeds 0-4 (each seed's models are trained once and cached
under tests/.cache). Slow: about two models to train plus a few minutes of tests per seed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SENSITIVE = [
    "tests/test_reference_models.py::test_trained_cnn_is_accurate",
    "tests/test_reference_models.py::test_grad_cam_points_at_objects",
    "tests/test_faithfulness.py::test_grad_cam_beats_the_random_order_on_the_reference_cnn",
    "tests/test_perturbation.py::test_localization_on_shapes",
    "tests/test_policy.py::test_clever_hans_fails_the_shortcut_check_and_the_clean_model_passes",
    "tests/test_surrogate.py::test_fidelity_on_held_out_shapes",
    "tests/test_adversarial.py::test_deepfool_minimal_and_fooling",
    "tests/test_adversarial.py::test_adversarial_explainer_fgsm",
    "tests/test_adversarial.py::test_generators_train_fast_and_play_their_roles",
    "tests/test_robustness.py",
    "tests/test_sanity.py::test_randomization_gate_passes_gradient_methods_and_fails_the_edge_detector",
    "tests/test_sanity.py::test_label_randomization_changes_model_dependent_explanations_only",
    "tests/test_deconvolve.py::test_trained_cnn_explanation",
    "tests/test_perception.py::test_metrics_on_the_fitted_decoder",
    "tests/test_gradient_methods.py::test_integrated_gradients_completeness",
    "tests/test_gaze_table1.py::test_table1_fem_beats_centre_bias_and_random_grad_cam_beats_random",
    "tests/test_registry_sanity_gate.py",
]


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("seed", range(5))
def test_trained_model_assertions_hold_for_every_seed(seed, tmp_path):
    env = {
        **os.environ,
        "XAI_TEST_MODEL_SEED": str(seed),
        "XAI_NO_PROGRESS": "1",
        "XAI_FIT_DIR": str(tmp_path / "fitted"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *SENSITIVE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"seed {seed}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
