"""DeConvolve's describers (template, openai_compatible against a local chat-completions server) and
the weighted semantic averaging of their sentences (section 3.4.2)."""

from __future__ import annotations

import base64
import json
import random
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from xai_plugins.describers.openai_compatible import DescriberError, OpenAICompatibleDescriber
from xai_plugins.describers.template import TemplateDescriber
from xai_plugins.explainers.deconvolve.text import semantic_average

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- template ------------------------------------------------------------------------------------
def disc(size: int, cy: float, cx: float, area: float) -> torch.Tensor:
    """A planted activation: a disc covering ``area`` of the image, centred at (cy, cx) fractions."""
    r = (area * size * size / torch.pi) ** 0.5
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((yy - cy * size) ** 2 + (xx - cx * size) ** 2) <= r * r).float()


def percent(text: str) -> int:
    return int(re.search(r"about (\d+)% of the image", text).group(1))


@pytest.mark.parametrize(
    "cy,cx,name",
    [
        (0.25, 0.25, "top-left"),
        (0.25, 0.75, "top-right"),
        (0.75, 0.25, "bottom-left"),
        (0.75, 0.75, "bottom-right"),
    ],
)
@pytest.mark.parametrize("area,size_word", [(0.04, "small"), (0.15, "medium-sized")])
def test_template_names_quadrant_and_size(cy, cx, name, area, size_word):
    heat = disc(64, cy, cx, area) * 0.9
    image = torch.full((3, 64, 64), 0.5)
    text = TemplateDescriber().describe(image, heat, {})
    assert f"in the {name} of the image" in text
    assert size_word in text and "one compact" in text
    assert abs(percent(text) - 100 * area) <= 1.5


def test_template_colour_mask_overlap_and_score():
    heat = disc(48, 0.5, 0.5, 0.3)
    image = torch.full((3, 48, 48), 0.8)
    image[:, heat > 0] = torch.tensor([0.85, 0.1, 0.1]).view(3, 1)
    ctx = {"filter": 7, "layer": "features", "score": 0.31, "class_name": "circle", "mask": heat > 0}
    text = TemplateDescriber().describe(image, heat, ctx)
    assert text.startswith("Filter 7 of layer features highlights one compact, large region")
    assert "in the center of the image" in text and "mostly red" in text
    assert "lies on the object (100% inside)" in text
    assert "supports 'circle' strongly (score +0.310)" in text
    outside = TemplateDescriber().describe(image, heat, dict(ctx, mask=heat == 0, score=-0.01))
    assert "lies mostly outside the object (0% inside)" in outside
    assert "speaks against 'circle' weakly (score -0.010)" in outside


def test_template_scattered_and_silent():
    heat = torch.zeros(40, 40)
    for y, x in [(4, 4), (4, 34), (34, 4), (34, 34), (20, 20)]:
        heat[y : y + 3, x : x + 3] = 1.0
    text = TemplateDescriber().describe(None, heat, {})
    assert "5 scattered regions" in text
    silent = TemplateDescriber().describe(None, torch.zeros(8, 8), {"filter": 3, "score": 0.2})
    assert "silent" in silent and "Filter 3" in silent


# -- openai_compatible against a local server -------------------------------------------------------
class ChatServer:
    """A minimal OpenAI chat-completions endpoint on 127.0.0.1 with switchable failure modes."""

    def __init__(self):
        self.mode, self.requests, self.fail_first = "ok", [], 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if server.fail_first > 0:
                    server.fail_first -= 1
                    return self.reply(503, b'{"error": {"message": "warming up"}}')
                if server.mode == "slow":
                    time.sleep(1.5)
                if server.mode == "malformed":
                    return self.reply(200, b"<html>not json</html>")
                if server.mode == "no_choices":
                    return self.reply(200, json.dumps({"object": "chat.completion", "choices": []}).encode())
                if self.path != "/v1/chat/completions":
                    return self.reply(404, b'{"error": {"message": "not found"}}')
                doc = json.loads(body)
                images = [p for p in doc["messages"][-1]["content"] if p["type"] == "image_url"]
                answer = f"A bright shape in {len(images)} views; model {doc['model']}."
                self.reply(
                    200,
                    json.dumps(
                        {
                            "id": "chatcmpl-1",
                            "object": "chat.completion",
                            "created": 0,
                            "model": doc["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": answer},
                                }
                            ],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                        }
                    ).encode(),
                )

            def reply(self, code, payload):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server():
    server = ChatServer()
    yield server
    server.close()


@pytest.fixture
def closed_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def views():
    heat = disc(32, 0.3, 0.3, 0.1)
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    return image, heat, {"proportionate": image * heat, "encircled": image}


def test_openai_request_follows_chat_completions_format(chat_server):
    image, heat, v = views()
    d = OpenAICompatibleDescriber(url=chat_server.url, model="llava-test", api_key="sk-local", retries=0)
    text = d.describe(image, heat, {"class_name": "circle", "score": 0.2, "views": v})
    assert text == "A bright shape in 2 views; model llava-test."
    req = chat_server.requests[-1]
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == "Bearer sk-local"
    doc = json.loads(req["body"])
    assert doc["model"] == "llava-test" and doc["messages"][0]["role"] == "system"
    parts = doc["messages"][1]["content"]
    assert parts[0]["type"] == "text" and "circle" in parts[0]["text"]
    for part in parts[1:]:
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        assert base64.b64decode(url.split(",", 1)[1]).startswith(PNG_MAGIC)


def test_openai_configured_from_environment_and_retries(chat_server, monkeypatch):
    monkeypatch.setenv("XAI_DESCRIBER_URL", chat_server.url)
    monkeypatch.setenv("XAI_DESCRIBER_MODEL", "env-model")
    chat_server.fail_first = 1  # one 503, then an answer
    image, heat, _ = views()
    text = OpenAICompatibleDescriber(retries=1, backoff=0.01).describe(image, heat, {})
    assert "env-model" in text and "1 views" in text
    assert len(chat_server.requests) == 2


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("malformed", "malformed answer from http://127.0.0.1"),
        ("no_choices", "no choices[0].message.content"),
    ],
)
def test_openai_malformed_answer_is_one_clear_line(chat_server, mode, expected):
    chat_server.mode = mode
    d = OpenAICompatibleDescriber(url=chat_server.url, model="m", retries=2, backoff=0.01)
    with pytest.raises(DescriberError) as err:
        d.describe(None, disc(16, 0.5, 0.5, 0.1), {})
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert len(chat_server.requests) == 1  # a malformed answer is not retried


def test_openai_unreachable_and_slow_endpoints(chat_server, closed_url):
    with pytest.raises(DescriberError, match=r"cannot reach http://127\.0\.0\.1:\d+/v1/chat/completions"):
        OpenAICompatibleDescriber(url=closed_url, model="m", retries=1, backoff=0.01).describe(
            None, torch.ones(8, 8), {}
        )
    chat_server.mode = "slow"
    start = time.perf_counter()
    with pytest.raises(DescriberError, match=r"no answer from .* within 0\.3 s \(after 2 attempts\)"):
        OpenAICompatibleDescriber(
            url=chat_server.url, model="m", timeout=0.3, retries=1, backoff=0.01
        ).describe(None, torch.ones(8, 8), {})
    assert time.perf_counter() - start < 3.0


def test_openai_missing_configuration_is_clear(monkeypatch):
    monkeypatch.delenv("XAI_DESCRIBER_URL", raising=False)
    with pytest.raises(DescriberError, match="XAI_DESCRIBER_URL"):
        OpenAICompatibleDescriber(model="m").describe(None, torch.ones(4, 4), {})


def test_openai_falls_back_to_template(closed_url):
    d = OpenAICompatibleDescriber(url=closed_url, model="m", retries=0, fallback="template")
    heat = disc(32, 0.75, 0.75, 0.05)
    with pytest.warns(UserWarning, match="falling back to the template describer"):
        text = d.describe(None, heat, {"filter": 2})
    assert text == TemplateDescriber().describe(None, heat, {"filter": 2})
    assert "cannot reach" in d.last_error
    start = time.perf_counter()
    d.describe(None, heat, {})  # within the cool-down: no new connection attempt
    assert time.perf_counter() - start < 0.5


def test_deconvolve_text_through_openai_endpoint(
    chat_server, functional_relu_cnn, images32, tmp_path, monkeypatch
):
    from core.api import explain

    monkeypatch.setenv("XAI_FIT_DIR", str(tmp_path))
    exp = explain(
        functional_relu_cnn,
        images32,
        method="deconvolve",
        ascent_steps=2,
        top_k=1,
        describer="openai_compatible",
        describer_params={"url": chat_server.url, "model": "vlm"},
    )
    assert exp.extras["describer"] == "openai_compatible"
    assert all("model vlm" in t for t in exp.extras["text"])
    assert len(chat_server.requests) == sum(len(rows) for rows in exp.extras["filters"])


# -- weighted semantic averaging -------------------------------------------------------------------
PLANE = {"alpha": (1.0, 0.0), "beta": (0.0, 1.0), "gamma": (0.8, 0.6)}


def plane_embed(sentences):
    return torch.tensor([PLANE[s] for s in sentences])


@pytest.mark.parametrize("beta_score,summary", [(-0.05, "alpha"), (-1.0, "gamma"), (-20.0, "beta")])
def test_semantic_average_weights_buckets_by_mean_score(beta_score, summary):
    """Buckets (2 per sign): alpha (+1.0, strong), gamma (+0.01, weak), beta (negative). The summary
    is the sentence nearest the bucket centroids averaged with weights |mean bucket score|."""
    agg = semantic_average(["alpha", "gamma", "beta"], [1.0, 0.01, beta_score], plane_embed, buckets=2)
    assert [b.sentence for b in agg.buckets] == ["alpha", "gamma", "beta"]  # ordered by mean score
    assert agg.text == "alpha gamma beta"
    assert agg.summary == summary


def test_semantic_bucket_centroid_is_score_weighted():
    # one bucket holding alpha and beta: the |score|-weighted centroid decides which one represents it
    agg = semantic_average(["alpha", "beta"], [0.9, 0.8], plane_embed, buckets=1)
    assert len(agg.buckets) == 1 and agg.buckets[0].sentence == "alpha"
    agg = semantic_average(["alpha", "beta"], [0.8, 0.9], plane_embed, buckets=1)
    assert agg.buckets[0].sentence == "beta"


def test_semantic_average_is_order_invariant_with_minilm():
    from xai_plugins.describers import semantic

    pairs = [
        ("The filter highlights the red circle in the top-left corner.", 0.42),
        ("A round red object in the upper left supports the prediction.", 0.31),
        ("The bright disc at the top left drives the decision.", 0.05),
        ("A blue square in the bottom right speaks against the class.", -0.22),
        ("The striped background near the lower right edge lowers the score.", -0.03),
        ("The textured background on the right side is weakly negative.", -0.02),
    ]
    reference = semantic_average([p[0] for p in pairs], [p[1] for p in pairs], semantic.embed, buckets=2)
    assert semantic.embedder_name() == "all-MiniLM-L6-v2"
    for seed in range(3):
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        agg = semantic_average([p[0] for p in shuffled], [p[1] for p in shuffled], semantic.embed, buckets=2)
        assert (agg.text, agg.summary) == (reference.text, reference.summary)
        assert [(b.sentence, b.mean_score) for b in agg.buckets] == [
            (b.sentence, b.mean_score) for b in reference.buckets
        ]
    # the strong positive bucket (two sentences about a red circle at the top left) dominates
    assert "red" in reference.summary
    assert reference.buckets[0].mean_score == pytest.approx((0.42 + 0.31) / 2)
