"""A quick smoke of the bench harness on a tiny model: suites are discovered, cases timed against
their peer and the limit, failures reported as rows, results written as JSON."""

from __future__ import annotations

import json
import time

import pytest
import torch

from bench import harness
from bench.harness import Case, Settings


def test_time_case_reports_medians_and_errors():
    calls = {"ours": 0, "peer": 0}

    def ours():
        calls["ours"] += 1
        time.sleep(0.002)

    def peer():
        calls["peer"] += 1
        time.sleep(0.02)

    t_ours, t_peer, t_limit, err, perr = harness.time_case(Case("m", ours, "p", peer), lambda: None, 3)
    assert (len(t_ours), len(t_peer), len(t_limit), err, perr) == (3, 3, 3, None, None)
    assert calls == {"ours": 4, "peer": 4}  # one warm-up, then 3 rounds
    row = harness.Row("tiny", "s", "m", "p", t_ours, t_peer, t_limit)
    assert row.speedup > 3 and row.ours_over_limit > 1 and row.limit_s < row.ours_s
    # the ratios pair the rounds: a machine twice as slow in one round does not skew them
    skewed = harness.Row("tiny", "s", "m", "p", [1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [0.5, 1.0, 0.5])
    assert skewed.speedup == 2.0 and skewed.ours_over_limit == 2.0

    def boom():
        raise ValueError("broken peer")

    t_ours, t_peer, _, err, perr = harness.time_case(Case("m", ours, "p", boom), lambda: None, 2)
    assert t_ours and not t_peer and err is None and "broken peer" in perr
    t_ours, _, _, err, _ = harness.time_case(Case("m", boom), lambda: None, 2)
    assert not t_ours and "broken peer" in err


def test_a_long_case_gets_one_round_after_its_untimed_warm_up():
    """The cold first call (first-touch memory) is never the measurement: it would charge whichever
    side runs first (AttnLRP on ViT-B/16: 13.9 s cold against 7.8 s warm)."""
    n = {"calls": 0}

    def slow():
        n["calls"] += 1
        time.sleep(0.3 if n["calls"] == 1 else 0.05)

    t_ours = harness.time_case(Case("m", slow), lambda: None, repeats=5, long_s=0.01)[0]
    assert len(t_ours) == 1 and n["calls"] == 2
    assert t_ours[0] < 0.2, t_ours


def test_discover_reports_broken_suites(tmp_path):
    (tmp_path / "suite_good.py").write_text(
        "from bench.harness import Case\n"
        "def cases(model, inputs, targets):\n"
        "    return [Case('ok', lambda: model(inputs), 'self', lambda: model(inputs)),\n"
        "            Case('fails', lambda: 1 / 0)]\n"
    )
    (tmp_path / "suite_broken.py").write_text("import no_such_module_xyz\n")
    suites = harness.discover(directory=tmp_path)
    assert set(suites) == {"good", "broken"} and isinstance(suites["broken"], ImportError)
    settings = Settings(models=["tiny"], batch=2, size=32, repeats=1)
    rows = harness.run_model("tiny", settings, suites, log=lambda s: None)
    by = {(r.suite, r.method): r for r in rows}
    assert "import failed" in by[("broken", "(suite)")].error
    assert "ZeroDivisionError" in by[("good", "fails")].error
    ok = by[("good", "ok")]
    assert ok.error is None and ok.ours_over_limit > 0 and ok.speedup > 0
    text = harness.table(rows)
    assert "import failed" in text and "ZeroDivisionError" in text and "ours/limit" in text


def test_gradient_suite_runs_end_to_end_on_a_tiny_model(tmp_path):
    path = tmp_path / "out.json"
    code = harness.main(
        ["--quick", "--models", "tiny", "--suites", "gradient", "--size", "32", "--json", str(path)]
    )
    assert code == 0
    data = json.loads(path.read_text())
    rows = {(r["method"], r["peer"]): r for r in data["rows"]}
    assert data["meta"]["quick"] and data["meta"]["batch"] == 2
    for method, peer in [
        ("saliency", "captum.Saliency"),
        ("grad_cam", "pytorch_grad_cam.GradCAM"),
        ("score_cam", "pytorch_grad_cam.ScoreCAM"),
        ("integrated_gradients", "captum.IntegratedGradients"),
    ]:
        row = rows[(method, peer)]
        assert row["error"] is None and row["peer_error"] is None, row
        assert row["ours_over_limit"] > 0 and row["speedup"] > 0
    shared = [r for r in data["rows"] if r["method"].startswith("shared(")]
    assert len(shared) == 1 and shared[0]["error"] is None


def test_methods_filter_times_only_the_named_methods(tmp_path):
    path = tmp_path / "out.json"
    code = harness.main(
        [
            "--quick",
            "--models",
            "tiny",
            "--suites",
            "gradient",
            "--size",
            "32",
            "--methods",
            "saliency,grad_cam_pp",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    methods = {r["method"] for r in json.loads(path.read_text())["rows"]}
    assert methods == {"saliency", "grad_cam_pp"}
    assert harness.parse_args(["--methods", " a, b ,"]).methods == ["a", "b"]
    assert harness.parse_args([]).methods is None


@pytest.mark.parametrize(
    "argv,expected",
    [([], (16, 112, 3)), (["--quick"], (2, 64, 1)), (["--quick", "--batch", "4"], (4, 64, 1))],
)
def test_settings(argv, expected):
    s = harness.parse_args(argv)
    assert (s.batch, s.size, s.repeats) == expected and s.models == ["resnet18", "vgg11"]


def test_limit_is_a_forward_and_input_backward():
    model = harness.make_model("tiny")
    x = harness.make_inputs(2, 32)
    g = harness.limit_fn(model, x, torch.tensor([0, 1]))()
    assert g.shape == x.shape and g.abs().sum() > 0
