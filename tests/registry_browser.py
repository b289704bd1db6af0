"""Headless Chromium, driven over the DevTools protocol, showing an MLflow HTML artifact the way the
MLflow UI does (``ShowArtifactHtmlView``: the artifact fetched from ``get-artifact``, turned into a
``text/html`` blob and shown in ``<iframe sandbox="allow-scripts">``). Used by the registry tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
]

SHOW_LIKE_MLFLOW = """
(async () => {
  const resp = await fetch(%(url)s);
  if (!resp.ok) return {error: 'get-artifact answered ' + resp.status};
  const html = await resp.text();
  const frame = document.createElement('iframe');
  frame.setAttribute('sandbox', 'allow-scripts');
  frame.id = 'html';
  frame.style.width = '1200px'; frame.style.height = '900px';
  const loaded = new Promise(r => frame.onload = r);
  frame.src = URL.createObjectURL(new Blob([html], {type: 'text/html'}));
  document.body.appendChild(frame);
  await loaded;
  return {bytes: html.length};
})()
"""

INSPECT_IMAGES = """
(async () => {
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; })));
  return {title: document.title, count: imgs.length,
          broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60)),
          external: imgs.filter(i => !i.src.startsWith('data:')).map(i => i.src.slice(0, 80)),
          text: document.body.innerText.slice(0, 200)};
})()
"""


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _CDP:
    """A minimal DevTools client (flattened sessions). Frames that Chromium puts in a process of their
    own (sandboxed iframes are) attach as targets; they wait for us, so no early error is missed."""

    def __init__(self, ws: Any):
        self.ws, self.next_id = ws, 0
        self.events: list[dict[str, Any]] = []
        self.frames: dict[str, str] = {}  # target id -> session id of attached iframes

    async def send(self, method: str, session: str | None = None, **params: Any) -> int:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        await self.ws.send_json(msg)
        return self.next_id

    async def _event(self, msg: dict[str, Any]) -> None:
        self.events.append(msg)
        if msg["method"] == "Target.attachedToTarget":
            info, session = msg["params"]["targetInfo"], msg["params"]["sessionId"]
            if info.get("type") != "iframe":
                return
            self.frames[info["targetId"]] = session
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                await self.send(domain, session)
            await self.send("Runtime.runIfWaitingForDebugger", session)

    async def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        my_id = await self.send(method, session, **params)
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                await self._event(msg)

    async def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = await self.ws.receive_json(timeout=max(0.05, end - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                return
            if "method" in msg:
                await self._event(msg)

    async def wait_for(self, method: str, session: str, since: int, timeout: float = 60.0) -> None:
        """Until an event ``method`` of ``session`` arrives after the first ``since`` events."""
        end = time.monotonic() + timeout
        while not any(e["method"] == method and e.get("sessionId") == session for e in self.events[since:]):
            if time.monotonic() > end:
                raise RuntimeError(f"no {method} within {timeout:.0f} s")
            await self.drain(0.1)

    async def evaluate(
        self, expression: str, session: str | None = None, context_id: int | None = None
    ) -> Any:
        params: dict[str, Any] = {"expression": expression, "awaitPromise": True, "returnByValue": True}
        if context_id is not None:
            params["contextId"] = context_id
        result = await self.call("Runtime.evaluate", session, **params)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate failed: {result['exceptionDetails']}")
        return result["result"].get("value")


def _errors(events: list[dict[str, Any]]) -> list[str]:
    """Script errors and console/log errors (favicon misses of the host page aside)."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            out.append(json.dumps(p.get("exceptionDetails", {}))[:500])
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(json.dumps(p.get("args", []))[:500])
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            if "favicon" not in (entry.get("url") or "") + entry.get("text", ""):
                out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url') or ''}")
    return out


@contextlib.asynccontextmanager
async def _blank_page(debug_port: int) -> AsyncIterator[tuple[_CDP, str]]:
    """A CDP connection to the browser on ``debug_port`` and a new blank page (Page, Runtime, Log on)."""
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json/version", timeout=30) as resp:
        browser_ws = json.loads(resp.read())["webSocketDebuggerUrl"]
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(browser_ws, max_msg_size=0) as ws:
            cdp = _CDP(ws)
            target = await cdp.call("Target.createTarget", url="about:blank")
            page = (await cdp.call("Target.attachToTarget", targetId=target["targetId"], flatten=True))[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log"):
                await cdp.call(f"{domain}.enable", page)
            yield cdp, page


async def _inspect(debug_port: int, origin: str, artifact_url: str) -> dict[str, Any]:
    async with _blank_page(debug_port) as (cdp, page):
        await cdp.call(
            "Target.setAutoAttach", page, autoAttach=True, waitForDebuggerOnStart=True, flatten=True
        )
        await cdp.call("Page.navigate", page, url=f"{origin}/health")
        await cdp.drain(2.0)
        shown = await cdp.evaluate(SHOW_LIKE_MLFLOW % {"url": json.dumps(artifact_url)}, page)
        await cdp.drain(1.0)
        if cdp.frames:
            report = await cdp.evaluate(INSPECT_IMAGES, next(iter(cdp.frames.values())))
        else:  # the iframe stayed in the page's process
            tree = await cdp.call("Page.getFrameTree", page)
            children = tree["frameTree"].get("childFrames", [])
            if not children:
                return {"shown": shown, "error": "no iframe", "errors": _errors(cdp.events)}
            world = await cdp.call(
                "Page.createIsolatedWorld", page, frameId=children[0]["frame"]["id"], worldName="inspect"
            )
            report = await cdp.evaluate(INSPECT_IMAGES, page, world["executionContextId"])
        await cdp.drain(0.5)
        return {"shown": shown, **report, "errors": _errors(cdp.events)}


def inspect_html_artifact(origin: str, artifact_url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Show ``artifact_url`` (an MLflow ``get-artifact`` URL on ``origin``) like the MLflow UI does and
    report its images (count, broken, external) and every script/console error."""
    return in_chromium(lambda port: _inspect(port, origin, artifact_url), timeout)


def in_chromium(session: Callable[[int], Awaitable[Any]], timeout: float) -> Any:
    """Start a headless Chromium with a fresh profile, run ``session(devtools_port)``, kill it."""
    exe = chromium_path()
    assert exe, "chromium not found"
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.is_file() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            return asyncio.run(asyncio.wait_for(session(port), timeout))
        finally:  # chromium's helpers (renderer, zygote) share its process group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


LOADED = """
(async () => {
  if (document.readyState !== 'complete') await new Promise(r => addEventListener('load', r, {once: true}));
  const nav = performance.getEntriesByType('navigation')[0];
  return nav ? nav.responseStatus : 0;
})()
"""

PAGE_IMAGES = """
(async () => {
  const code = performance.getEntriesByType('navigation')[0]?.responseStatus;
  if (code !== 200) return {status: 'http ' + code, images: 0, text: document.body.innerText, broken: []};
  for (const i of document.images) i.loading = 'eager';
  window.scrollTo(0, document.body.scrollHeight);
  const imgs = [...document.images].filter(i => !i.hidden && i.getAttribute('src'));
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = r; i.onerror = r; })));
  return {status: 'ok', images: imgs.length, text: document.body.innerText,
          broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 80))};
})()
"""

EXPLAIN_SAMPLE = """
(async () => {
  document.getElementById('go').click();
  for (let k = 0; k < 600; k++) {
    const map = document.getElementById('od-map'), err = document.getElementById('ondemand-error');
    if (err.textContent) return {error: err.textContent};
    if (!map.hidden && map.complete && map.naturalWidth > 0) return {map: map.src};
    await new Promise(r => setTimeout(r, 100));
  }
  return {error: 'no map within 60 s'};
})()
"""


async def _open(cdp: _CDP, page: str, url: str) -> int:
    """Navigate and wait for the document's load event; the HTTP status of its response."""
    since = len(cdp.events)
    await cdp.call("Page.navigate", page, url=url)
    await cdp.wait_for("Page.loadEventFired", page, since)
    return int(await cdp.evaluate(LOADED, page) or 0)


async def _pages(
    debug_port: int, base: str, token: str, paths: list[str], explain_path: str | None
) -> dict[str, Any]:
    async with _blank_page(debug_port) as (cdp, page):
        await cdp.call("Page.navigate", page, url=f"{base}/?token={token}")
        await cdp.drain(1.0)
        shown: dict[str, Any] = {}
        for path in paths:
            await _open(cdp, page, base + path)
            shown[path] = await cdp.evaluate(PAGE_IMAGES, page)
        explained = None
        if explain_path:
            await _open(cdp, page, base + explain_path)
            explained = await cdp.evaluate(EXPLAIN_SAMPLE, page)
        await cdp.drain(0.5)
        return {"pages": shown, "explained": explained, "errors": _errors(cdp.events)}


def page_report(
    base: str, token: str, paths: list[str], explain_path: str | None = None, timeout: float = 180.0
) -> dict[str, Any]:
    """Open the explorer with its token, then each page: images (all loaded, lazy ones scrolled into
    view), text, and every script/console error; on ``explain_path`` press Explain and wait for the map."""
    return in_chromium(lambda port: _pages(port, base, token, paths, explain_path), timeout)


async def _shots(
    debug_port: int,
    base: str,
    token: str,
    shots: dict[str, tuple[str, bool]],
    out_dir: Path,
    width: int,
    max_height: int,
) -> dict[str, Any]:
    import base64

    async with _blank_page(debug_port) as (cdp, page):
        await cdp.call(
            "Emulation.setDeviceMetricsOverride",
            page,
            width=width,
            height=800,
            deviceScaleFactor=1,
            mobile=False,
        )
        await _open(cdp, page, f"{base}/?token={token}")
        done: dict[str, Any] = {}
        for name, (path, explain) in shots.items():
            await _open(cdp, page, base + path)
            done[name] = await cdp.evaluate(EXPLAIN_SAMPLE if explain else PAGE_IMAGES, page)
            await cdp.evaluate("window.scrollTo(0, 0)", page)
            height = await cdp.evaluate("document.documentElement.scrollHeight", page)
            shot = await cdp.call(
                "Page.captureScreenshot",
                page,
                format="png",
                captureBeyondViewport=True,
                clip={"x": 0, "y": 0, "width": width, "height": min(height, max_height), "scale": 1},
            )
            (out_dir / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        return {"shots": done, "errors": _errors(cdp.events)}


def page_screenshots(
    base: str,
    token: str,
    shots: dict[str, tuple[str, bool]],
    out_dir: Path,
    width: int = 1100,
    max_height: int = 1400,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """``out_dir/<name>.png`` for each ``name: (path, press_explain)``: the page at ``width`` px, its top
    ``max_height`` px (Page.captureScreenshot), after pressing Explain and waiting for the map if asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return in_chromium(lambda port: _shots(port, base, token, shots, out_dir, width, max_height), timeout)
