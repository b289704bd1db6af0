"""Headless Chromium (Debian's package, launched by Playwright as its ``executable_path``) showing an
MLflow HTML artifact the way the MLflow UI does (``ShowArtifactHtmlView``: the artifact fetched from
``get-artifact``, turned into a ``text/html`` blob and shown in ``<iframe sandbox="allow-scripts">``),
and the explorer's pages. Used by the registry and explorer tests and ``docs/make_screenshots.py``.

Nothing is downloaded: Playwright's own browsers are not used."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.async_api import ConsoleMessage, Error, Page

# Playwright adds --headless (and its own temporary profile); without the background-networking
# flags Chromium's calls home on the closed network end in refused connections.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
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


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class _Errors(list):
    """Every uncaught script error and console error/assert of a page and of its frames (out-of-process
    iframes included: Playwright attaches them before they run), favicon misses of the host aside.
    Chromium's own log entries (a resource that failed to load) come as console errors too."""

    def __init__(self, page: Page):
        super().__init__()
        page.on("console", self._console)
        page.on("pageerror", self._pageerror)

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type not in ("error", "assert"):
            return
        url = msg.location.get("url") or ""
        if "favicon" not in url + msg.text:
            self.append(f"console.{msg.type}: {msg.text} {url}"[:500].strip())

    def _pageerror(self, err: Error) -> None:
        self.append((err.stack or f"{err.name}: {err.message}")[:500])


async def _open(page: Page, url: str) -> int:
    """Navigate and wait for the document's load event; the HTTP status of its response."""
    resp = await page.goto(url, wait_until="load")
    return resp.status if resp else 0


async def _inspect(page: Page, origin: str, artifact_url: str) -> dict[str, Any]:
    errors = _Errors(page)
    await _open(page, f"{origin}/health")
    shown = await page.evaluate(SHOW_LIKE_MLFLOW % {"url": json.dumps(artifact_url)})
    await page.wait_for_timeout(1000)
    holder = await page.query_selector("iframe#html")
    frame = await holder.content_frame() if holder else None
    if frame is None:
        return {"shown": shown, "error": "no iframe", "errors": list(errors)}
    report = await frame.evaluate(INSPECT_IMAGES)
    await page.wait_for_timeout(500)
    return {"shown": shown, **report, "errors": list(errors)}


def inspect_html_artifact(origin: str, artifact_url: str, timeout: float = 120.0) -> dict[str, Any]:
    """Show ``artifact_url`` (an MLflow ``get-artifact`` URL on ``origin``) like the MLflow UI does and
    report its images (count, broken, external) and every script/console error."""
    return in_chromium(lambda page: _inspect(page, origin, artifact_url), timeout)


def in_chromium(
    session: Callable[[Page], Awaitable[Any]],
    timeout: float,
    viewport: dict[str, int] | None = None,
) -> Any:
    """Launch the system's headless Chromium with Playwright (a fresh profile), run ``session(page)`` on
    a new page (of ``viewport`` size, device scale 1, if given) within ``timeout`` s, close Chromium."""
    exe = chromium_path()
    assert exe, "chromium not found"

    async def run() -> Any:
        from playwright.async_api import async_playwright

        async with async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=exe, args=CHROMIUM_FLAGS, headless=True, timeout=timeout * 1000
            )
            try:
                context = await browser.new_context(
                    viewport=viewport, device_scale_factor=1 if viewport else None
                )
                page = await context.new_page()
                page.set_default_timeout(timeout * 1000)
                return await asyncio.wait_for(session(page), timeout)
            finally:  # also on timeout or error: no chromium is left behind
                await browser.close()

    return asyncio.run(run())


async def _pages(
    page: Page, base: str, token: str, paths: list[str], explain_path: str | None
) -> dict[str, Any]:
    errors = _Errors(page)
    await _open(page, f"{base}/?token={token}")
    shown: dict[str, Any] = {}
    for path in paths:
        await _open(page, base + path)
        shown[path] = await page.evaluate(PAGE_IMAGES)
    explained = None
    if explain_path:
        await _open(page, base + explain_path)
        explained = await page.evaluate(EXPLAIN_SAMPLE)
    await page.wait_for_timeout(500)
    return {"pages": shown, "explained": explained, "errors": list(errors)}


def page_report(
    base: str, token: str, paths: list[str], explain_path: str | None = None, timeout: float = 180.0
) -> dict[str, Any]:
    """Open the explorer with its token, then each page: images (all loaded, lazy ones scrolled into
    view), text, and every script/console error; on ``explain_path`` press Explain and wait for the map."""
    return in_chromium(lambda page: _pages(page, base, token, paths, explain_path), timeout)


async def _shots(
    page: Page,
    base: str,
    token: str,
    shots: dict[str, tuple[str, bool]],
    out_dir: Path,
    width: int,
    max_height: int,
) -> dict[str, Any]:
    errors = _Errors(page)
    await _open(page, f"{base}/?token={token}")
    done: dict[str, Any] = {}
    for name, (path, explain) in shots.items():
        await _open(page, base + path)
        done[name] = await page.evaluate(EXPLAIN_SAMPLE if explain else PAGE_IMAGES)
        await page.evaluate("window.scrollTo(0, 0)")
        height = await page.evaluate("document.documentElement.scrollHeight")
        await page.screenshot(
            path=out_dir / f"{name}.png",
            type="png",
            full_page=True,
            clip={"x": 0, "y": 0, "width": width, "height": min(height, max_height)},
        )
    return {"shots": done, "errors": list(errors)}


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
    ``max_height`` px (``page.screenshot``), after pressing Explain and waiting for the map if asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return in_chromium(
        lambda page: _shots(page, base, token, shots, out_dir, width, max_height),
        timeout,
        viewport={"width": width, "height": 800},
    )
