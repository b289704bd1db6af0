"""The explorer (`xai ui`) in real headless Chromium (Debian's package, driven by Playwright as
the report test does) against a real local MLflow server with two registered versions, each with a
run logged the way the worker logs it (``registry.runlog``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from registry_browser import chromium_path, page_report

ROOT = Path(__file__).resolve().parent.parent
MODEL = "ui-cnn"
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        chromium_path() is None, reason="chromium is not installed (apt-get install chromium)"
    ),
]


def _log_version(client, ws: Path, lm, checkpoint: Path, seed: int) -> str:
    from core import workflow
    from core.datasets import make_shapes
    from registry import runlog
    from registry.models import register_checkpoint

    version = str(register_checkpoint(client, MODEL, checkpoint).version)
    run_id, _ = runlog.find_or_start(client, "xai-explanations", f"{MODEL}/{version}@t", MODEL, version, "t")
    ds = make_shapes(4, size=32, seed=seed, watermark="agree")
    out = ws / f"v{version}"
    results = workflow.run(
        lm.model,
        lm.preprocess.normalize(ds.images),
        {"saliency": {}, "lrp": {}},
        images=ds.images,
        labels=ds.labels,
        masks=ds.masks,
        class_names=lm.class_names,
        metrics=["localization", "sanity"],
        reporters=["json", "html"],
        out_dir=out,
        progress=False,
    )
    assert not results.failures, results.failures
    value = results.metrics["saliency"]["localization.relevance_mass"]
    verdict = {
        "passed": value > 0.25,
        "status": "passed" if value > 0.25 else "failed",
        "checks": [
            {
                "name": "saliency <b>looks</b>",
                "method": "saliency",
                "metric": "localization.relevance_mass",
                "value": value,
                "op": ">",
                "threshold": 0.25,
                "passed": value > 0.25,
            }
        ],
    }
    runlog.log_outputs(
        client,
        run_id,
        {"out_dir": out, "results": out / "results.json", "report": out / "report.html", "gate": verdict},
        ws,
    )
    runlog.finish(client, run_id, verdict)
    for key, val in (("xai.gate", verdict["status"]), ("xai.run_id", run_id), ("xai.status", "done")):
        client.set_model_version_tag(MODEL, version, key, val)
    return version


@pytest.fixture(scope="module")
def ui(tmp_path_factory, trained_cnn, clever_hans_cnn):
    from core.models import save_checkpoint
    from registry import server
    from registry.models import client_for

    ws = tmp_path_factory.mktemp("ui-ws")
    info = server.start(ws)
    try:
        client = client_for(info["uri"])
        versions = []
        for i, lm in enumerate((trained_cnn, clever_hans_cnn)):
            ckpt = save_checkpoint(ws / f"m{i}.pt", lm.model, lm.arch, lm.preprocess, lm.class_names, lm.meta)
            versions.append(_log_version(client, ws, lm, ckpt, seed=7))
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": info["uri"],
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "core.cli", "ui", "-w", str(ws)],
            env=env,
            cwd=ws,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = proc.stdout.readline()
        assert "?token=" in line, line + proc.stdout.read()
        url = line.split()[3]
        base, token = url.split("/?token=")
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline and proc.poll() is None, "xai ui did not answer"
                time.sleep(0.3)
        yield {"base": base, "token": token, "versions": versions}
        proc.terminate()
        proc.wait(timeout=30)
    finally:
        server.stop(ws)


def test_every_page_renders_in_chromium_without_errors_or_broken_images(ui):
    a, b = ui["versions"]
    pages = [
        "/",
        f"/m/{MODEL}/{a}",
        f"/m/{MODEL}/{b}",
        f"/m/{MODEL}/compare?a={a}&b={b}",
        f"/m/{MODEL}/{a}/deconvolve",
        f"/m/{MODEL}/{a}/pv",
    ]
    report = page_report(ui["base"], ui["token"], pages, explain_path=f"/m/{MODEL}/{a}")
    for path, shown in report["pages"].items():
        assert shown["status"] == "ok", (path, shown)
        assert not shown["broken"], (path, shown["broken"])
    assert not report["errors"], report["errors"]
    version_page = report["pages"][f"/m/{MODEL}/{a}"]
    assert version_page["images"] >= 8 and "<b>looks</b>" in version_page["text"]  # escaped, shown as text
    compare = report["pages"][f"/m/{MODEL}/compare?a={a}&b={b}"]
    assert f"version {a}" in compare["text"] and f"version {b}" in compare["text"]
    assert compare["images"] >= 16
    assert report["explained"]["map"].startswith("data:image/png;base64,"), report["explained"]


def _request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url, data=data, headers=headers or {}, method="POST" if data is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_token_csrf_uploads_and_paths_are_checked(ui):
    from registry.ui.security import COOKIE, csrf_for

    base, token, (a, _) = ui["base"], ui["token"], ui["versions"]
    assert _request(f"{base}/")[0] == 401
    assert _request(f"{base}/?token=wrong")[0] == 401
    cookie = {"Cookie": f"{COOKIE}={token}"}
    assert _request(f"{base}/", headers=cookie)[0] == 200
    api = f"{base}/api/explain/{MODEL}/{a}?method=saliency"
    assert _request(api, b"", cookie)[0] == 403  # no CSRF token
    good = {**cookie, "X-CSRF-Token": csrf_for(token)}
    status, body = _request(api, b"not an image", good)
    assert status == 400 and "not a readable image" in json.loads(body)["error"]
    status, body = _request(f"{base}/api/explain/{MODEL}/{a}?method=grad_cam&layer=nope", b"", good)
    assert status == 200 and "grad_cam" in json.loads(body)["error"]  # the failure in its cell
    for path in ("../../etc/passwd", "/etc/passwd", "mlflow-run.json", "report.html"):
        assert _request(f"{base}/m/{MODEL}/{a}/file?path={path}", headers=cookie)[0] == 404
    assert _request(f"{base}/m/..%2Fx/{a}", headers=cookie)[0] in (400, 404)


def test_method_extras_become_json_panels_text_and_filters():
    import torch

    from registry.ui.ondemand import method_extras

    extras = {
        "images": {"mask": torch.rand(2, 1, 8, 8), "pv": torch.rand(2, 3, 8, 8) * 3, "scalar": torch.rand(2)},
        "text": ["first <b>image</b>", "second"],
        "filters": [
            [{"filter": 3, "sign": "positive", "score": torch.tensor(0.123456), "evidence": 1.0}],
            [],
        ],
    }
    out = method_extras(extras, scale=2)
    assert [p["title"] for p in out["panels"]] == ["mask", "pv"]
    assert all(p["image"].startswith("data:image/png;base64,") for p in out["panels"])
    assert out["text"] == "first <b>image</b>"
    assert out["filters"] == [{"filter": 3, "sign": "positive", "score": 0.1235, "sentence": ""}]
    json.dumps(out)
    assert method_extras({"layer": "features"}, scale=1) == {}
