"""DeConvolve (Meeradevi et al.): filter scores, filter maps and textual explanations.

Image-agnostic part, fitted once per model version (``core.fitting``, stored with the model's
fingerprint): the filter scores of Algorithm 1 (``scoring``), the correlation of each filter's
constant sweep with the class probability (section 3.2, ``sweep_correlation``), and the filters'
gradient-ascent patterns of section 3.3 (``filter_maps``; ``ascent="class"``, the paper's, ascends
the class activation through the filter alone, ``ascent="filter"`` the filter's own activation).
Per image (section 3.4):

- the layer's feature maps A_k; each filter's evidence for the explained class c is its score
  S[k, c] times its mean activation on the image (``rank="evidence"``; ``rank="score"`` ranks by the
  image-agnostic score alone, as the paper does - a filter silent on the image can then be chosen);
- ``maps``: the aggregated filter evidence sum_k S[k, c] * ReLU(A_k) (a CAM whose channel weights
  are Algorithm 1's scores), upsampled; the drawn map is its positive part;
- the ``top_k`` most influential positive and negative filters, their feature maps superimposed on
  the image as the proportionate and the encircled threshold heat maps (``superimpose``). The paper
  superimposes the stored image-agnostic map; an image-agnostic pattern carries no location in the
  image, so we superimpose the filter's feature map on this image and show the stored pattern of the
  top filter next to it (``images["top_filter_pattern"]``). ``sharpen`` (section 3.4.1's trade-off
  between focus and context) raises the [0, 1] heat maps to that power before superimposing and
  describing them: > 1 sharpens onto the hottest region, < 1 keeps more context, 1 leaves them;
- every chosen filter's map is described by a describer plugin (``template`` by default,
  ``openai_compatible`` for a multimodal LLM) and the sentences are aggregated by score buckets with
  weighted semantic averaging (``text``).

extras: ``filter_scores`` / ``filter_evidence`` / ``filter_correlation`` (B x K: each image's class;
the last the sweep's Pearson correlation), ``filters`` (per image: the chosen filters with score,
correlation, evidence, sign and sentence), ``text`` and ``summary`` (one string per
image), ``images`` (proportionate, encircled, negative_proportionate, negative_encircled,
top_filter_pattern), ``layer_scores`` (with ``score_layers="all"``: every conv layer's B x K scores).
"""

from __future__ import annotations

from typing import Any

import torch

from xai_plugins import Describer, Explainer, XAIError, hookimpl
from xai_plugins.explainers.deconvolve import filter_maps, superimpose
from xai_plugins.explainers.deconvolve.scoring import filter_scores, sweep_correlation
from xai_plugins.explainers.deconvolve.selection import Evidence, layer_evidence
from xai_plugins.explainers.deconvolve.text import CachedEmbedder, semantic_average
from xai_plugins.toolkit import conv_layers


def get_describer(spec: Any, params: dict[str, Any] | None) -> Describer:
    """A describer instance from a registered name (or an instance, used as is)."""
    if isinstance(spec, Describer):
        return spec
    from xai_plugins.toolkit import get_host  # the host's registry of describer plugins

    return get_host().get("describer", str(spec))(**(params or {}))


class DeConvolve(Explainer):
    """DeConvolve: Algorithm 1 filter scores, gradient-ascent filter maps, superimposed heat maps
    and their textual explanation (see the module docstring)."""

    name = "deconvolve"
    space = "map"
    trainable = True
    fit_params = ("layer", "steps", "score_layers", "ascent", "ascent_steps", "ascent_lr", "seed")
    params = {
        "layer": None,
        "steps": 5,
        "score_layers": "explained",
        "ascent": "class",
        "ascent_steps": 50,
        "ascent_lr": 0.05,
        "sharpen": 1.0,
        "top_k": 3,
        "rank": "evidence",
        "threshold": 0.5,
        "sigma": 1.0,
        "text": True,
        "describer": "template",
        "describer_params": None,
        "buckets": 2,
        "class_names": None,
        "mean": None,
        "std": None,
        "seed": 0,
        "batch_size": 64,
    }

    def __init__(self, **params: Any):
        super().__init__(**params)
        if self.config["rank"] not in ("evidence", "score"):
            raise XAIError(f"deconvolve: rank must be 'evidence' or 'score', not {self.config['rank']!r}")
        if self.config["score_layers"] not in ("explained", "all"):
            raise XAIError("deconvolve: score_layers must be 'explained' or 'all'")
        if self.config["ascent"] not in ("class", "filter"):
            raise XAIError(f"deconvolve: ascent must be 'class' or 'filter', not {self.config['ascent']!r}")
        if not float(self.config["sharpen"]) > 0:
            raise XAIError("deconvolve: sharpen must be a positive exponent")
        self.state: dict[str, Any] | None = None

    # -- fitted, image-agnostic part ------------------------------------------------------------
    def fit(self, model: torch.nn.Module, data: Any) -> dict[str, Any]:
        shape = tuple(int(s) for s in data.inputs.shape[1:])
        layer = str(self.config["layer"])
        bs = int(self.config["batch_size"]) * 4
        main = filter_scores(model, layer, shape, int(self.config["steps"]), bs)
        state: dict[str, Any] = {
            "layer": layer,
            "input_shape": list(shape),
            "scores": main.scores,
            "curve": main.curve,
            "values": main.values,
            "baseline": main.baseline,
        }
        if self.config["score_layers"] == "all":
            state["layer_scores"] = {
                n: filter_scores(model, n, shape, 2, bs).scores for n, _ in conv_layers(model)
            }
        filters = list(range(main.scores.shape[0]))
        ascent = dict(
            steps=int(self.config["ascent_steps"]),
            lr=float(self.config["ascent_lr"]),
            seed=int(self.config["seed"]),
            batch_size=int(self.config["batch_size"]),
        )
        if self.config["ascent"] == "class":  # each filter towards the class it scores highest for
            classes = main.scores.argmax(1).tolist()
            patterns = filter_maps.ascend_class(model, layer, shape, filters, classes, **ascent)
        else:
            patterns = filter_maps.ascend_filters(model, layer, shape, filters, **ascent)
        state["patterns"] = filter_maps.shrink(patterns)
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        self.state = state

    # -- per image ------------------------------------------------------------------------------
    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        if self.state is None:
            raise XAIError(
                "deconvolve: not fitted (the engine fits it; call fit/load_state when using it directly)"
            )
        state = self.state
        ev = layer_evidence(model, inputs, targets, state["layer"], state["scores"], self.config["rank"])
        images = self.display_images(inputs)
        size = tuple(inputs.shape[-2:])
        k = int(self.config["top_k"])
        pos, neg = ev.top(k, positive=True), ev.top(k, positive=False)
        corr = sweep_correlation(state["curve"], state["values"])[:, targets.cpu()].T.contiguous()
        ev.correlation = corr
        extras: dict[str, Any] = {
            "filter_scores": ev.scores.cpu(),
            "filter_evidence": ev.evidence.cpu(),
            "filter_correlation": corr,
            "images": self.superimposed(images, ev, pos, neg, size),
            "layer": state["layer"],
        }
        if "layer_scores" in state:
            t = targets.cpu()
            extras["layer_scores"] = {n: s[:, t].T.contiguous() for n, s in state["layer_scores"].items()}
        extras.update(self.describe(images, ev, pos, neg, targets, size))
        return ev.aggregate_map(), extras

    def superimposed(
        self,
        images: torch.Tensor,
        ev: Evidence,
        pos: list[list[int]],
        neg: list[list[int]],
        size: tuple[int, int],
    ) -> dict[str, torch.Tensor]:
        """The chosen positive (negative) filters' maps, |evidence|-weighted, superimposed both ways;
        and the stored gradient-ascent pattern of each image's top positive filter."""
        th, sg = float(self.config["threshold"]), float(self.config["sigma"])
        pos_heat, neg_heat = (
            self.sharpened(ev.group_heat(pos, size)),
            self.sharpened(ev.group_heat(neg, size)),
        )
        out = {
            "proportionate": superimpose.proportionate(images, pos_heat),
            "encircled": superimpose.encircled(images, pos_heat, th, sg),
            "negative_proportionate": superimpose.proportionate(images, neg_heat),
            "negative_encircled": superimpose.encircled(images, neg_heat, th, sg, colour=(0.1, 0.3, 1.0)),
        }
        patterns = self.state.get("patterns") if self.state else None
        if patterns is not None and any(pos):
            shown = filter_maps.display(patterns[torch.tensor([row[0] if row else 0 for row in pos])], size)
            has = torch.tensor([bool(row) for row in pos]).view(-1, 1, 1, 1)
            out["top_filter_pattern"] = torch.where(has, shown, torch.zeros_like(shown))
        return {n: v.detach().float().cpu() for n, v in out.items()}

    def sharpened(self, heat: torch.Tensor) -> torch.Tensor:
        """[0, 1] heat maps raised to ``sharpen`` (section 3.4.1: focus against context)."""
        gamma = float(self.config["sharpen"])
        return heat if gamma == 1.0 else heat.clamp(0, 1).pow(gamma)

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        """The drawn map: the positive part of the aggregated filter evidence."""
        return attributions.clamp(min=0).reshape(attributions.shape[0], *attributions.shape[-2:])

    def display_images(self, inputs: torch.Tensor) -> torch.Tensor:
        """Inputs as images in [0, 1]: the model's preprocessing undone when ``mean``/``std`` are
        given, else a per-image min-max over all channels (keeps hues roughly)."""
        x = inputs.detach().float()
        mean, std = self.config["mean"], self.config["std"]
        if mean is not None and std is not None:
            m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = x * s + m
        else:
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-12)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x[:, :3].clamp(0, 1)

    def class_name(self, c: int) -> str:
        names = self.config["class_names"]
        return str(names[c]) if names and 0 <= c < len(names) else f"class {c}"

    def describe(
        self,
        images: torch.Tensor,
        ev: Evidence,
        pos: list[list[int]],
        neg: list[list[int]],
        targets: torch.Tensor,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """Describe every chosen filter's superimposed map; aggregate the sentences per image."""
        b = images.shape[0]
        if not self.config["text"]:
            return {"filters": [self.chosen(ev, i, pos[i], neg[i], None) for i in range(b)]}
        from xai_plugins.describers import semantic

        describer = get_describer(self.config["describer"], self.config["describer_params"])
        per_image, errors = [], []
        for i in range(b):
            per_image.append(
                self.sentences(describer, images[i], ev, i, pos[i], neg[i], int(targets[i]), size, errors)
            )
        embed = CachedEmbedder(semantic.embed, [s for sentences in per_image for s in sentences.values()])
        aggregates = [
            semantic_average(
                list(sentences.values()),
                [float(ev.scores[i, f]) for f in sentences],
                embed,
                int(self.config["buckets"]),
            )
            for i, sentences in enumerate(per_image)
        ]
        out: dict[str, Any] = {
            "text": [a.text for a in aggregates],
            "summary": [a.summary for a in aggregates],
            "filters": [self.chosen(ev, i, pos[i], neg[i], per_image[i]) for i in range(b)],
            "text_embedding": semantic.embedder_name(),
            "describer": describer.name,
        }
        if errors:
            out["describer_errors"] = sorted(set(errors))
        return out

    def sentences(
        self,
        describer: Describer,
        image: torch.Tensor,
        ev: Evidence,
        i: int,
        pos: list[int],
        neg: list[int],
        target: int,
        size: tuple[int, int],
        errors: list[str],
    ) -> dict[int, str]:
        """One sentence per chosen filter of image ``i``: its map superimposed both ways, described."""
        chosen = pos + neg
        if not chosen:
            return {}
        th, sg = float(self.config["threshold"]), float(self.config["sigma"])
        heat = self.sharpened(ev.filter_heat(i, chosen, size))
        img = image.unsqueeze(0).expand(len(chosen), -1, -1, -1)
        views = {
            "proportionate": superimpose.proportionate(img, heat),
            "encircled": superimpose.encircled(img, heat, th, sg),
        }
        out = {}
        for j, f in enumerate(chosen):
            context = {
                "filter": f,
                "layer": ev.layer,
                "score": float(ev.scores[i, f]),
                "evidence": float(ev.evidence[i, f]),
                "class_name": self.class_name(target),
                "sign": "positive" if f in pos else "negative",
                "views": {k: v[j] for k, v in views.items()},
            }
            out[f] = describer.describe(image, heat[j], context)
            if getattr(describer, "last_error", None):
                errors.append(describer.last_error)
        return out

    @staticmethod
    def chosen(
        ev: Evidence, i: int, pos: list[int], neg: list[int], sentences: dict[int, str] | None
    ) -> list[dict]:
        rows = []
        for sign, group in (("positive", pos), ("negative", neg)):
            for f in group:
                row = {
                    "filter": f,
                    "sign": sign,
                    "score": float(ev.scores[i, f]),
                    "evidence": float(ev.evidence[i, f]),
                }
                if ev.correlation is not None:
                    row["correlation"] = float(ev.correlation[i, f])
                if sentences is not None:
                    row["sentence"] = sentences.get(f, "")
                rows.append(row)
        return rows


@hookimpl
def xai_explainers():
    return [DeConvolve]
