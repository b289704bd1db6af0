"""The `openai_compatible` describer: a multimodal LLM behind the OpenAI chat-completions API
(vLLM, Ollama, llama.cpp server, LM Studio, OpenAI itself) labels a superimposed heat map
(DeConvolve, section 3.4.1: "the superimposed heatmaps are passed into a multimodal large language
model with an appropriate prompt for context-aware labeling").

Request: ``POST {url}/chat/completions`` (``url`` is the API base, e.g. ``http://127.0.0.1:8000/v1``;
a URL already ending in ``/chat/completions`` is used as is) with a system prompt and one user
message holding the text prompt and the images as base64 PNG data URLs (``image_url`` parts).
Answer: ``choices[0].message.content``.

Configuration: ``url``, ``model``, ``api_key`` parameters, else the environment variables
``XAI_DESCRIBER_URL``, ``XAI_DESCRIBER_MODEL``, ``XAI_DESCRIBER_API_KEY``. ``timeout`` limits each
request (seconds); connection failures, time-outs, HTTP 408/429/5xx are retried ``retries`` times
with exponential backoff. Every failure ends in one clear line (``DescriberError``); with
``fallback="template"`` the template describer answers instead and the error is kept in
``last_error``; for ``cooldown`` seconds after a failure the fallback answers at once, so a dead
endpoint is not waited for once per heat map. Only the standard library is used for HTTP.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from typing import Any

import torch

from xai_plugins import Describer, XAIError, hookimpl
from xai_plugins.describers.template import TemplateDescriber
from xai_plugins.toolkit import overlay, png_bytes

SYSTEM_PROMPT = (
    "You explain what one filter of an image classifier (a CNN) looks at. You see the input image "
    "with the filter's heat map superimposed: in the proportionate view pixel brightness is "
    "proportional to the filter's focus; in the encircled view the focus region is outlined. "
    "Answer in one or two plain sentences: what object or part lies in the highlighted region and "
    "where it is. Do not describe the colours of the heat map itself."
)
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class DescriberError(XAIError):
    """A describer backend could not answer (unreachable, too slow, malformed answer, HTTP error)."""


def one_line(text: Any, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def data_url(image: Any) -> str:
    """An image tensor/array in [0, 1] as a base64 PNG data URL."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAICompatibleDescriber(Describer):
    """Labels superimposed heat maps with a multimodal LLM behind an OpenAI-compatible endpoint."""

    name = "openai_compatible"
    params = {
        "url": None,
        "model": None,
        "api_key": None,
        "timeout": 60.0,
        "retries": 2,
        "backoff": 1.0,
        "fallback": None,
        "max_tokens": 160,
        "temperature": 0.0,
        "system_prompt": SYSTEM_PROMPT,
        "prompt": None,
        "views": ("proportionate", "encircled"),
        "cooldown": 60.0,
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        self.last_error: str | None = None
        self._failed_at: float | None = None
        fb = self.config["fallback"]
        if fb not in (None, "", "template"):
            raise XAIError(f"openai_compatible: fallback must be 'template' or None, not {fb!r}")
        self._fallback = TemplateDescriber() if fb == "template" else None

    # -- configuration --------------------------------------------------------------------------
    def endpoint(self) -> str:
        url = self.config["url"] or os.environ.get("XAI_DESCRIBER_URL")
        if not url:
            raise DescriberError(
                "openai_compatible describer: no endpoint; pass url= or set XAI_DESCRIBER_URL "
                "(e.g. http://127.0.0.1:8000/v1)"
            )
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise DescriberError(f"openai_compatible describer: {url!r} is not an http(s) URL")
        url = url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def model_name(self) -> str:
        model = self.config["model"] or os.environ.get("XAI_DESCRIBER_MODEL")
        if not model:
            raise DescriberError(
                "openai_compatible describer: no model; pass model= or set XAI_DESCRIBER_MODEL"
            )
        return str(model)

    # -- the request ----------------------------------------------------------------------------
    def user_prompt(self, context: dict[str, Any]) -> str:
        if self.config["prompt"]:
            return str(self.config["prompt"]).format(
                **{k: v for k, v in context.items() if isinstance(v, (str, int, float))}
            )
        cls = context.get("class_name")
        score = context.get("score")
        text = "Describe the region this filter focuses on."
        if cls is not None and score is not None:
            relation = "supports" if float(score) > 0 else "speaks against"
            text += f" The model predicts '{cls}', and this filter {relation} that prediction (score {float(score):+.3f})."
        return text

    def images(self, image: Any, heatmap: Any, context: dict[str, Any]) -> list[Any]:
        views = context.get("views") or {}
        chosen = [views[v] for v in self.config["views"] if v in views]
        if chosen:
            return chosen
        if image is None:
            return [heatmap]
        return [overlay(image, heatmap)]

    def request_body(self, image: Any, heatmap: Any, context: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = [{"type": "text", "text": self.user_prompt(context)}]
        for img in self.images(image, heatmap, context):
            if isinstance(img, torch.Tensor) and img.dim() == 3 and img.shape[0] not in (1, 3):
                img = img.permute(2, 0, 1)
            content.append({"type": "image_url", "image_url": {"url": data_url(img)}})
        return {
            "model": self.model_name(),
            "messages": [
                {"role": "system", "content": self.config["system_prompt"]},
                {"role": "user", "content": content},
            ],
            "max_tokens": int(self.config["max_tokens"]),
            "temperature": float(self.config["temperature"]),
        }

    def _post(self, url: str, body: bytes) -> bytes:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self.config["api_key"] or os.environ.get("XAI_DESCRIBER_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        handlers = [urllib.request.ProxyHandler({})] if is_loopback(url) else []
        opener = urllib.request.build_opener(*handlers)
        with opener.open(request, timeout=float(self.config["timeout"])) as response:
            return response.read()

    @staticmethod
    def parse(raw: bytes) -> str:
        """``choices[0].message.content`` (a string, or a list of text parts)."""
        try:
            doc = json.loads(raw.decode("utf-8"))
            content = doc["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not JSON ({type(exc).__name__}: {one_line(exc, 80)})") from None
        except (KeyError, IndexError, TypeError):
            raise ValueError("no choices[0].message.content in the answer") from None
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise ValueError("empty message content")
        return " ".join(content.split())

    def ask(self, image: Any, heatmap: Any, context: dict[str, Any]) -> str:
        """One description from the endpoint, or ``DescriberError`` with a one-line reason."""
        url = self.endpoint()
        body = json.dumps(self.request_body(image, heatmap, context)).encode("utf-8")
        attempts = int(self.config["retries"]) + 1
        last = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(float(self.config["backoff"]) * 2 ** (attempt - 1))
            try:
                raw = self._post(url, body)
            except urllib.error.HTTPError as exc:
                detail = one_line(exc.read().decode("utf-8", "replace"), 120) if exc.fp else ""
                last = f"{url} answered HTTP {exc.code}" + (f": {detail}" if detail else "")
                if exc.code not in RETRY_STATUS:
                    break
                continue
            except TimeoutError:
                last = f"no answer from {url} within {float(self.config['timeout']):g} s"
                continue
            except urllib.error.URLError as exc:
                reason = exc.reason
                if isinstance(reason, TimeoutError):
                    last = f"no answer from {url} within {float(self.config['timeout']):g} s"
                else:
                    last = f"cannot reach {url}: {one_line(getattr(reason, 'strerror', None) or reason, 120)}"
                continue
            except (ConnectionError, OSError) as exc:
                last = f"cannot reach {url}: {one_line(exc, 120)}"
                continue
            try:
                return self.parse(raw)
            except ValueError as exc:
                last = f"malformed answer from {url}: {exc}"
                break
        tries = f" (after {attempt + 1} attempts)" if attempt else ""
        raise DescriberError(f"openai_compatible describer: {last}{tries}")

    def describe(self, image: Any, heatmap: Any, context: dict[str, Any]) -> str:
        context = context or {}
        if (
            self._fallback is not None
            and self._failed_at is not None
            and time.monotonic() - self._failed_at < float(self.config["cooldown"])
        ):
            # the endpoint failed moments ago: do not wait for it once per heat map
            return self._fallback.describe(image, heatmap, context)
        try:
            text = self.ask(image, heatmap, context)
            self.last_error, self._failed_at = None, None
            return text
        except DescriberError as exc:
            self.last_error, self._failed_at = str(exc), time.monotonic()
            if self._fallback is None:
                raise
            warnings.warn(f"{exc}; falling back to the template describer", stacklevel=2)
            return self._fallback.describe(image, heatmap, context)


@hookimpl
def xai_describers():
    return [OpenAICompatibleDescriber]
