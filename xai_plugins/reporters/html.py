"""The `html` reporter: one self-contained page (images inlined as data URIs, no scripts).

Failures and skipped inputs first; then per probe image (correctly classified, then misclassified),
the input and each method's heat-map overlay side by side (plus the extra images a method returns,
e.g. PV's reconstruction); the metric table (one column per method); figures, wrapped in a grid.
Every text that comes from data or plugins is escaped.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import torch

from xai_plugins import Reporter, RunResults, hookimpl, redact_text
from xai_plugins.toolkit import data_uri, display_scale, overlay, png_bytes, signed_overlay, signed_relevance

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e7;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}
.meta{color:#5b6474;font-size:13px}table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #dde1e7;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f0f2f5}
.grid td{text-align:center}.grid img{display:block;margin:auto;image-rendering:pixelated}
.cap{font-size:11px;color:#5b6474;max-width:180px}.bad{color:#b00020}.ok{color:#0a7d32}
.fail{background:#fff2f2;border:1px solid #f2c4c4;padding:8px 12px;border-radius:6px;font-size:13px}
.figs{display:flex;flex-wrap:wrap;gap:8px}.figs figure{margin:0}
.figs img{display:block;width:380px;border:1px solid #dde1e7;background:#fff}
.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def esc(value: Any) -> str:
    """Text for the page: secrets masked (URI passwords, api_key=...), then HTML-escaped."""
    return html.escape(redact_text(value), quote=True)


def img_tag(png: bytes, alt: str, title: str = "") -> str:
    return f'<img src="{data_uri(png)}" alt="{esc(alt)}" title="{esc(title or alt)}">'


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return esc(value)


def extra_image(tensor: torch.Tensor, i: int) -> torch.Tensor | None:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3 or i >= tensor.shape[0]:
        return None
    return tensor[i].detach().float().cpu().clamp(0, 1)


class HTMLReporter(Reporter):
    """Writes report.html: inputs and heat maps side by side, metrics, figures and failures."""

    name = "html"
    params = {"filename": "report.html", "max_images": 48, "title": "Explanation report", "alpha": 0.5}

    def write(self, results: RunResults, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        parts = [
            f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(self.config["title"])}'
            f"</title><style>{CSS}</style></head><body>"
        ]
        parts.append(self._header(results))
        parts.append(self._failures(results))
        parts.append(self._grid(results))
        parts.append(self._metrics(results))
        parts.append(self._figures(results))
        parts.append("</body></html>")
        path = out_dir / self.config["filename"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(parts), encoding="utf-8")
        tmp.replace(path)
        return path

    def _header(self, r: RunResults) -> str:
        meta = r.meta
        model = meta.get("model", {})
        bits = [f"<h1>{esc(self.config['title'])}</h1><div class=meta>"]
        if isinstance(model, dict) and model:
            bits.append(" · ".join(f"{esc(k)}: {esc(v)}" for k, v in model.items()))
            bits.append("<br>")
        n = len(r.image_names)
        bits.append(f"{n} image{'s' if n != 1 else ''} · methods: {esc(', '.join(r.explanations) or 'none')}")
        if r.labels is not None and n:
            acc = float((r.labels == r.predictions).float().mean())
            bits.append(f" · accuracy on these images: {acc:.0%}")
        gate = meta.get("gate")
        if isinstance(gate, dict) and "passed" in gate:
            cls = "ok" if gate["passed"] else "bad"
            bits.append(f" · gate: <b class={cls}>{'passed' if gate['passed'] else 'failed'}</b>")
        bits.append("</div>")
        return "".join(bits)

    def _failures(self, r: RunResults) -> str:
        out = []
        if r.failures:
            rows = "".join(
                f"<li><b>{esc(f.name)}</b> ({esc(f.stage)}, {esc(f.kind)}, plugin {esc(f.plugin)}): "
                f"{esc(f.message)}</li>"
                for f in r.failures
            )
            out.append(f"<h2>Failures</h2><div class=fail><ul>{rows}</ul></div>")
        if r.skipped_inputs:
            rows = "".join(f"<li>{esc(s.get('name'))}: {esc(s.get('reason'))}</li>" for s in r.skipped_inputs)
            out.append(f"<h2>Skipped inputs</h2><div class=fail><ul>{rows}</ul></div>")
        return "".join(out)

    def _metrics(self, r: RunResults) -> str:
        out = []
        keys = sorted(
            {k for m in r.metrics.values() for k, v in m.items() if not isinstance(v, (list, dict))}
        )
        if keys:  # one column per method: a handful of methods, often dozens of metric values
            labels = list(r.explanations)
            head = "".join(f"<th>{esc(label)}</th>" for label in labels)
            n = max(1, len(r.image_names))
            times = "".join(
                f"<td class=num>{r.timings.get(label, 0.0) / n * 1000:.1f}</td>" for label in labels
            )
            rows = [f"<tr><th>ms / image</th>{times}</tr>"]
            for k in keys:
                cells = "".join(
                    f"<td class=num>{fmt(r.metrics.get(label, {}).get(k, ''))}</td>" for label in labels
                )
                rows.append(f"<tr><th>{esc(k)}</th>{cells}</tr>")
            out.append(f"<h2>Metrics</h2><table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>")
        scalars = {k: v for k, v in r.global_metrics.items() if not isinstance(v, (list, dict))}
        if scalars:
            rows = "".join(
                f"<tr><th>{esc(k)}</th><td class=num>{fmt(v)}</td></tr>" for k, v in sorted(scalars.items())
            )
            out.append(f"<h2>Model metrics</h2><table>{rows}</table>")
        return "".join(out)

    def _figures(self, r: RunResults) -> str:
        figs = dict(r.figures)
        for label, exp in r.explanations.items():
            for name, png in (exp.extras.get("figures") or {}).items():
                if isinstance(png, bytes):
                    figs[f"{label}/{name}"] = png
        if not figs:
            return ""
        items = "".join(
            f"<figure>{img_tag(png, name)}<figcaption class=cap>{esc(name)}</figcaption></figure>"
            for name, png in sorted(figs.items())
        )
        return f"<h2>Figures</h2><div class=figs>{items}</div>"

    def _grid(self, r: RunResults) -> str:
        total = len(r.image_names)
        n = min(total, int(self.config["max_images"]))
        if not n:
            return "<h2>Images</h2><p>No image was explained.</p>"
        indices = list(range(n))
        more = f"<p class=meta>showing {n} of {total} images</p>" if n < total else ""
        if r.labels is None:
            return f"<h2>Images</h2>{more}{self._table(r, indices)}"
        wrong = [i for i in indices if int(r.labels[i]) != int(r.predictions[i])]
        right = [i for i in indices if i not in wrong]
        out = [f"<h2>Images</h2>{more}"]
        if right:
            out.append(f"<h3>Correctly classified ({len(right)})</h3>{self._table(r, right)}")
        if wrong:
            out.append(f"<h3>Misclassified ({len(wrong)})</h3>{self._table(r, wrong)}")
        return "".join(out)

    def _table(self, r: RunResults, indices: list[int]) -> str:
        labels = list(r.explanations)
        extra_cols: list[tuple[str, str]] = []
        for label in labels:
            for name, tensor in (r.explanations[label].extras.get("images") or {}).items():
                if isinstance(tensor, torch.Tensor):
                    extra_cols.append((label, name))
        signed = signed_relevance({label: r.explanations[label] for label in labels})
        legend = "<br><small>red: for the class, blue: against</small>"
        head = (
            "<th>input</th>"
            + "".join(f"<th>{esc(lab)}{legend if lab in signed else ''}</th>" for lab in labels)
            + "".join(f"<th>{esc(lab)}: {esc(name)}</th>" for lab, name in extra_cols)
        )
        scale = display_scale(r.images.shape[-2])
        names = r.class_names
        alpha = float(self.config["alpha"])
        rows = []
        for i in indices:
            image = r.images[i]
            t, p = int(r.targets[i]), int(r.predictions[i])
            tname = names[t] if names and t < len(names) else t
            pname = names[p] if names and p < len(names) else p
            cap = (
                f"{esc(r.image_names[i])}<br>explained: {esc(tname)} · predicted: {esc(pname)} "
                f"({float(r.probabilities[i, p]):.0%})"
            )
            if r.labels is not None:
                lab = int(r.labels[i])
                lname = names[lab] if names and lab < len(names) else lab
                ok = lab == p
                cap += (
                    f"<br>label: {esc(lname)} <span class={'ok' if ok else 'bad'}>{'✓' if ok else '✗'}</span>"
                )
            cells = [
                f"<td>{img_tag(png_bytes(image, scale), r.image_names[i])}<div class=cap>{cap}</div></td>"
            ]
            for label in labels:
                exp = r.explanations[label]
                if label in signed:
                    over = signed_overlay(image, signed[label][i])
                else:
                    over = overlay(image, exp.maps[i], alpha=alpha)
                text = exp.extras.get("text")
                caption = esc(text[i]) if isinstance(text, list) and i < len(text) else ""
                cells.append(
                    f"<td>{img_tag(png_bytes(over, scale), f'{label} map for {r.image_names[i]}')}"
                    f"<div class=cap>{caption}</div></td>"
                )
            for label, name in extra_cols:
                tensor = extra_image(r.explanations[label].extras["images"][name], i)
                cells.append(
                    f"<td>{img_tag(png_bytes(tensor, scale), f'{label} {name}') if tensor is not None else ''}</td>"
                )
            rows.append("<tr>" + "".join(cells) + "</tr>")
        return f"<table class=grid><tr>{head}</tr>{''.join(rows)}</table>"


@hookimpl
def xai_reporters():
    return [HTMLReporter]
