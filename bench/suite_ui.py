"""The explorer (``xai ui``) over HTTP: explain on demand for the demo-sized model, and a version page
with 64 probe images x 6 methods.

    python -m bench --suites ui --models tiny

The suite sets up its own fixture once (the harness's model and inputs are not used): a local MLflow
server in a temporary workspace, the DeConvolve reference CNN (32 px, the demo's model, seeded random
weights: timing needs no training) registered as a version, and a run logged the way the worker logs
it (``registry.runlog``) with 64 ``shapes`` images explained by 6 methods: 384 map PNGs. The app
(``registry.ui.app.create_app``) is served by uvicorn on 127.0.0.1 in this process.

Measured per request, from the client's side, warm (the harness's warm-up call loads the model and
fills the app's artifact cache, as the first visitor does):

- ``ui_explain_<method>``: ``POST /api/explain/...`` for a probe sample: the same engine, PNG data URIs
  of the image and its map back as JSON.
- ``ui_version_page_64x6_html``: ``GET`` the version page (its HTML only: 384 lazy ``<img>``).
- ``ui_version_page_64x6``: ``GET`` the version page, then the maps of its first screen (6 rows x 6
  methods; the grid's images are ``loading="lazy"``, so a browser fetches only those at first).

The harness's ``limit`` column (one forward + backward of its own model) does not apply here; read the
``ours s`` column against the issue's 1 s.
"""

from __future__ import annotations

import atexit
import http.client
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Case

MODEL = "bench-ui-cnn"
IMAGES = 64
METHODS = {
    "saliency": {},
    "integrated_gradients": {"steps": 16},
    "grad_cam": {},
    "lrp": {},
    "deeplift": {},
    "guided_backprop": {},
}
ON_DEMAND = ("saliency", "integrated_gradients", "grad_cam", "lrp")
FIRST_SCREEN_ROWS = 6
_FIXTURE: dict[str, Any] = {}


def _log_version(ws: Path, uri: str) -> str:
    """Register the reference CNN and log its explanations of ``IMAGES`` probe images (as the worker)."""
    from bench.ray_scale import make_checkpoint
    from core import workflow
    from core.datasets import make_shapes
    from core.models import load_model
    from registry import runlog
    from registry.models import client_for, register_checkpoint

    client = client_for(uri)
    checkpoint = make_checkpoint(ws)
    lm = load_model(checkpoint)
    version = str(register_checkpoint(client, MODEL, checkpoint).version)
    run_id, _ = runlog.find_or_start(
        client, "xai-explanations", f"{MODEL}/{version}@bench", MODEL, version, "bench"
    )
    ds = make_shapes(IMAGES, size=32, seed=7, watermark="agree")
    out = ws / "run"
    results = workflow.run(
        lm.model,
        lm.preprocess.normalize(ds.images),
        METHODS,
        images=ds.images,
        labels=ds.labels,
        masks=ds.masks,
        class_names=lm.class_names,
        metrics=["localization"],
        reporters=["json", "html"],
        out_dir=out,
        progress=False,
    )
    verdict = {"passed": True, "status": "passed", "checks": []}
    runlog.log_outputs(
        client,
        run_id,
        {"out_dir": out, "results": out / "results.json", "report": out / "report.html", "gate": verdict},
        ws,
    )
    runlog.finish(client, run_id, verdict)
    for key, val in (("xai.gate", "passed"), ("xai.run_id", run_id), ("xai.status", "done")):
        client.set_model_version_tag(MODEL, version, key, val)
    assert not results.failures, results.failures
    return version


def fixture() -> dict[str, Any]:
    """MLflow + one logged version + the app, made once per process and stopped at exit."""
    if _FIXTURE:
        return _FIXTURE
    from registry import server
    from registry.ui.cli import start_in_thread

    ws = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    uri = server.start(ws)["uri"]
    version = _log_version(ws, uri)
    srv, url = start_in_thread(uri)
    port, token = int(url.split(":")[2].split("/")[0]), url.split("?token=")[1]

    def stop() -> None:
        srv.should_exit = True
        server.stop(ws)
        shutil.rmtree(ws, ignore_errors=True)

    atexit.register(stop)
    from registry.ui.security import COOKIE, csrf_for

    _FIXTURE.update(port=port, version=version, headers={"Cookie": f"{COOKIE}={token}"}, csrf=csrf_for(token))
    return _FIXTURE


def _get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str], body: bytes | None = None
) -> bytes:
    conn.request("POST" if body is not None else "GET", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path} answered {resp.status}: {data[:200]!r}")
    return data


def explain_request(fx: dict[str, Any], method: str) -> dict[str, Any]:
    """One explain-on-demand request for probe sample 0; the answer (a map, not an error)."""
    conn = http.client.HTTPConnection("127.0.0.1", fx["port"], timeout=60)
    try:
        out = json.loads(
            _get(
                conn,
                f"/api/explain/{MODEL}/{fx['version']}?method={method}&sample=0",
                {**fx["headers"], "X-CSRF-Token": fx["csrf"]},
                b"",
            )
        )
    finally:
        conn.close()
    if "map" not in out:
        raise RuntimeError(f"{method}: {out.get('error')}")
    return out


def version_page(fx: dict[str, Any], first_screen: bool = True) -> int:
    """The version page and (``first_screen``) its first screen of maps over one connection; the
    number of maps fetched."""
    import re

    conn = http.client.HTTPConnection("127.0.0.1", fx["port"], timeout=60)
    try:
        html = _get(conn, f"/m/{MODEL}/{fx['version']}", fx["headers"]).decode()
        srcs = re.findall(r'<img class="map" loading="lazy"[^>]* src="([^"]+)"', html)
        if len(srcs) != IMAGES * len(METHODS):
            raise RuntimeError(f"the page shows {len(srcs)} maps, not {IMAGES * len(METHODS)}")
        first = srcs[: FIRST_SCREEN_ROWS * len(METHODS)] if first_screen else []
        for src in first:
            _get(conn, src.replace("&amp;", "&"), fx["headers"])
    finally:
        conn.close()
    return len(first)


def cases(model: Any, inputs: Any, targets: Any) -> list[Case]:
    fx = fixture()
    out = [
        Case(
            method=f"ui_explain_{m}",
            ours=lambda m=m: explain_request(fx, m),
            batch=1,
            note=f"POST explain on demand, deconvolve_cnn 32 px, {m}; target < 1 s",
        )
        for m in ON_DEMAND
    ]
    out.append(
        Case(
            method="ui_version_page_64x6_html",
            ours=lambda: version_page(fx, first_screen=False),
            batch=1,
            note=f"GET version page ({IMAGES} images x {len(METHODS)} methods), its HTML only",
        )
    )
    out.append(
        Case(
            method="ui_version_page_64x6",
            ours=lambda: version_page(fx),
            batch=1,
            note=f"GET version page ({IMAGES} images x {len(METHODS)} methods, lazy) + first "
            f"{FIRST_SCREEN_ROWS * len(METHODS)} maps; target < 1 s",
        )
    )
    return out
