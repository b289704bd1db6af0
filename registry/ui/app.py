"""The explorer's pages: registry, version (maps grid, metrics, gate, sanity curves), compare two
versions, DeConvolve and PV, and explain on demand. Every page is a Jinja2 template with autoescape."""

from __future__ import annotations

import asyncio
import json
import mimetypes
from pathlib import Path
from typing import Any

from registry.names import InvalidNameError, check_name, check_version
from registry.ui.data import SIGNED_METHODS, Explorer, metric_cards, sanity_curves
from registry.ui.ondemand import Models, UploadError, explain_one, sample_image, upload_image
from registry.ui.security import Guard, csrf_for

HERE = Path(__file__).parent
METHODS = (
    "saliency",
    "integrated_gradients",
    "grad_cam",
    "lrp",
    "deeplift",
    "occlusion",
    "deconvolve",
    "perception_visualization",
)


def create_app(tracking_uri: str, token: str) -> Any:
    """The ASGI app (token- and CSRF-guarded) over the MLflow at ``tracking_uri``."""
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True))
    explorer, models = Explorer(tracking_uri), Models(tracking_uri)
    csrf = csrf_for(token)

    def page(template: str, /, **context: Any) -> HTMLResponse:
        """``template`` rendered with ``context`` (positional-only: a context may hold ``name``, the model)."""
        return HTMLResponse(env.get_template(template).render(csrf=csrf, mlflow=tracking_uri, **context))

    def version_view(name: str, version: str) -> dict[str, Any]:
        row = explorer.version(name, version)
        run = row["run_id"]
        results = explorer.json_file(run, "results.json") if run else {}
        gate = explorer.json_file(run, "gate.json") if run else {}
        methods, cells = explorer.grid(run) if run else ([], {})
        images = results.get("images") or []
        return {
            "name": name,
            "row": row,
            "results": results,
            "gate": gate,
            "methods": methods,
            "cells": cells,
            "images": images,
            "cards": metric_cards(results),
            "curves": sanity_curves(results),
            "failures": results.get("failures") or [],
            "classes": sorted({str(r.get("prediction_name", "")) for r in images}),
            "signed": SIGNED_METHODS,
        }

    def checked(request: Any) -> tuple[str, str]:
        return check_name(request.path_params["name"]), check_version(request.path_params["version"])

    async def registry_page(request):
        return page("registry.html", models=await asyncio.to_thread(explorer.models))

    async def version_page(request):
        name, version = checked(request)
        view = await asyncio.to_thread(version_view, name, version)
        return page("version.html", **view, all_methods=METHODS)

    async def compare_page(request):
        name = check_name(request.path_params["name"])
        a, b = (
            check_version(request.query_params.get("a", "")),
            check_version(request.query_params.get("b", "")),
        )
        va, vb = await asyncio.gather(
            asyncio.to_thread(version_view, name, a), asyncio.to_thread(version_view, name, b)
        )
        return page("compare.html", name=name, a=va, b=vb, drift=drift(va, vb))

    async def extras_page(request):
        name, version = checked(request)
        kind = request.path_params["kind"]
        method = {"deconvolve": "deconvolve", "pv": "perception_visualization"}.get(kind)
        if method is None:
            return PlainTextResponse("404: no such page", status_code=404)
        view = await asyncio.to_thread(version_view, name, version)
        extras = ((view["results"].get("methods") or {}).get(method) or {}).get("extras") or {}
        return page("extras.html", **view, kind=kind, method=method, extras=extras)

    async def artifact(request):
        name, version = checked(request)
        path = request.query_params.get("path", "")
        run_id = await asyncio.to_thread(explorer.run_of, name, version)
        if not run_id or not path.endswith((".png", ".json", ".csv")):
            return PlainTextResponse("404: no such file", status_code=404)
        try:
            data = await asyncio.to_thread(explorer.read, run_id, path)
        except KeyError:
            return PlainTextResponse("404: no such file in this version's run", status_code=404)
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        return Response(data, media_type=kind, headers={"cache-control": "private, max-age=3600"})

    async def explain_api(request):
        name, version = checked(request)
        q = request.query_params
        method = q.get("method", "saliency")
        if method not in METHODS:
            return JSONResponse({"error": f"unknown method {method[:40]!r}"}, status_code=400)
        target = int(q["target"]) if q.get("target", "").isdigit() else None
        layer = q.get("layer") or None
        body = await request.body()
        try:
            loaded = await asyncio.to_thread(models.get, name, version)
            image = (
                await asyncio.to_thread(upload_image, loaded, body)
                if body
                else sample_image(loaded, min(int(q.get("sample", "0") or 0), 63))
            )
        except (UploadError, ValueError) as exc:
            return JSONResponse({"error": str(exc).splitlines()[0]}, status_code=400)
        result = await asyncio.to_thread(explain_one, loaded, image, method, target, layer)
        return JSONResponse(result, status_code=200)

    async def refused(request, exc):
        return PlainTextResponse(f"400: {str(exc).splitlines()[0]}", status_code=400)

    async def missing(request, exc):
        return PlainTextResponse("404: not found", status_code=404)

    from mlflow.exceptions import MlflowException

    routes = [
        Route("/", registry_page),
        Route("/m/{name}/compare", compare_page),
        Route("/m/{name}/{version}", version_page),
        Route("/m/{name}/{version}/file", artifact),
        Route("/m/{name}/{version}/{kind}", extras_page),
        Route("/api/explain/{name}/{version}", explain_api, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={InvalidNameError: refused, MlflowException: missing})
    return Guard(app, token)


def drift(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Per-image changes between two versions (prediction), metric and gate differences."""
    images = []
    for i, (ra, rb) in enumerate(zip(a["images"], b["images"])):
        images.append(
            {
                "index": i,
                "a": ra.get("prediction_name"),
                "b": rb.get("prediction_name"),
                "changed": ra.get("prediction") != rb.get("prediction"),
            }
        )
    metrics = []
    for method in sorted(set(a["cards"]) | set(b["cards"])):
        for key in sorted(set(a["cards"].get(method, {})) | set(b["cards"].get(method, {}))):
            va, vb = a["cards"].get(method, {}).get(key), b["cards"].get(method, {}).get(key)
            metrics.append(
                {
                    "method": method,
                    "key": key,
                    "a": va,
                    "b": vb,
                    "delta": (vb - va) if va is not None and vb is not None else None,
                }
            )
    gate_a = {c.get("name"): c for c in a["gate"].get("checks") or []}
    gate_b = {c.get("name"): c for c in b["gate"].get("checks") or []}
    gates = [
        {"name": n, "a": gate_a.get(n, {}).get("passed"), "b": gate_b.get(n, {}).get("passed")}
        for n in sorted(set(gate_a) | set(gate_b), key=str)
    ]
    return {"images": images, "metrics": metrics, "gates": gates}


def to_json(value: Any) -> str:
    return json.dumps(value)
