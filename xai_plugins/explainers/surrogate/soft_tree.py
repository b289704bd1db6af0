"""The ``soft_tree`` explainer: a soft decision tree distilled from the model (global explanation) and,
per image, its most probable path (local explanation). Trainable, stored per model version."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from xai_plugins import Explainer, XAIError

from .features import TreeFeatures
from .render import draw_tree, filter_images, prototype_images
from .tree import SoftTree


def display(inputs: torch.Tensor) -> torch.Tensor:
    lo = inputs.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = inputs.flatten(1).amax(1).view(-1, 1, 1, 1)
    return ((inputs - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


class SoftDecisionTree(Explainer):
    """Soft decision tree distilled from the model (Frosst & Hinton 2017; the review's Eq. 1).

    ``fit`` trains a tree of ``depth`` on 80 % of the fit data to reproduce the model's soft predictions
    softmax(f(x) / ``temperature``) (Adam, ``lr``, ``fit_epochs``, balancing ``penalty``), and measures its
    fidelity (agreement of the tree's prediction with the model's) on the other 20 %.

    ``features="input"``: nodes split on the standardized raw input, as Frosst & Hinton did on MNIST; each
    node filter is an image. On data where the class does not sit at fixed pixels (``shapes``: random
    position and color) linear splits of pixels cannot imitate a CNN (a linear classifier on the pixels
    distilled from the reference CNN agrees with it on ~33 % of held-out images), so
    the default ``features="layer"`` splits on the model's own global-average-pooled features at
    ``layer`` (default: the last convolutional stage); a node filter there is a vector over channels,
    rendered as the image sent most surely left and right, overlaid with the node's evidence map.

    Global explanation in ``extras``: ``figures["tree"]`` (PNG), ``tree`` (depth, fidelity, leaf class
    distributions). Local: ``text`` (the most probable path, one string per image), ``path`` (its inner
    nodes), ``leaf``, ``directions``, ``path_probability``, ``prediction`` (the tree's class). The map is the
    evidence for the path: sum over the path's nodes of +-(w_i . features) spread over positions (the
    product of each node filter with the input, or with the layer's activations), positive part.
    """

    name = "soft_tree"
    space = "map"
    trainable = True
    params = {
        "depth": 4,
        "features": "layer",
        "layer": None,
        "fit_epochs": 60,
        "lr": 0.01,
        "temperature": 1.0,
        "penalty": 0.1,
        "seed": 0,
        "class_names": None,
    }
    fit_params = ("depth", "features", "layer", "fit_epochs", "lr", "temperature", "penalty", "seed")

    tree: SoftTree | None = None
    checkpoint_path: Any = None

    def _features(self) -> TreeFeatures:
        return TreeFeatures(self.config["features"], self.config["layer"])

    def fit(self, model: nn.Module, data: Any) -> dict[str, Any]:
        cfg = self.config
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        feats = self._features()
        train, held = data.split(0.8)
        if len(held) == 0:
            raise XAIError("soft_tree needs at least 2 fit images (80 % train, 20 % held out)")
        spatial = feats.spatial(model, train.inputs.to(device))
        vectors = feats.vectors(spatial)
        with torch.no_grad():
            logits = torch.cat(
                [model(train.inputs[i : i + 256].to(device)) for i in range(0, len(train), 256)]
            )
        mean, std = (
            vectors.mean(0),
            vectors.std(0, unbiased=False).clamp_min(1e-6),
        )  # one train row: 0, not NaN
        z = (vectors - mean) / std
        targets = (logits.float() / cfg["temperature"]).softmax(1)
        torch.manual_seed(cfg["seed"])
        tree = SoftTree(z.shape[1], logits.shape[1], int(cfg["depth"])).to(device)
        opt = torch.optim.Adam(tree.parameters(), lr=cfg["lr"])
        gen = torch.Generator().manual_seed(cfg["seed"])
        with torch.enable_grad():
            for _ in range(int(cfg["fit_epochs"])):
                for idx in torch.randperm(z.shape[0], generator=gen).split(128):
                    loss = tree.loss(z[idx], targets[idx], cfg["penalty"])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        self._install(tree, mean, std)
        fidelity = self.fidelity(model, held.inputs.to(device))
        weights = self.effective_weights()
        if feats.kind == "input":
            images = filter_images(weights.cpu(), tuple(train.inputs.shape[1:]))
        else:
            with torch.no_grad():
                right = tree.decisions(z)
                reach, _ = tree.reach(right)
            images = prototype_images(
                display(train.inputs.float()),
                feats.contributions(spatial, weights).cpu(),
                reach.cpu(),
                right.cpu(),
            )
        return {
            "tree": {k: v.detach().cpu() for k, v in tree.state_dict().items()},
            "mean": mean.cpu(),
            "std": std.cpu(),
            "depth": int(cfg["depth"]),
            "classes": int(logits.shape[1]),
            "fidelity": fidelity,
            "held_out": len(held),
            "node_images": images,
        }

    def _install(self, tree: SoftTree, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.tree, self.mean, self.std = tree.eval(), mean, std

    def effective_weights(self) -> torch.Tensor:
        """Node weights on the unstandardized features: w_i / std."""
        return self.tree.inner.weight.detach() / self.std.to(self.tree.inner.weight.device)

    def decide(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        spatial = self._features().spatial(model, inputs)
        device = self.tree.inner.weight.device
        z = (self._features().vectors(spatial).to(device) - self.mean.to(device)) / self.std.to(device)
        with torch.no_grad():
            return spatial, self.tree.most_probable(z)

    def fidelity(self, model: nn.Module, inputs: torch.Tensor) -> float:
        """Fraction of ``inputs`` where the tree's prediction is the model's."""
        _, out = self.decide(model, inputs)
        with torch.no_grad():
            pred = torch.cat([model(inputs[i : i + 256]).argmax(1) for i in range(0, inputs.shape[0], 256)])
        return float((out["prediction"].to(pred.device) == pred).float().mean())

    def load_state(self, state: dict[str, Any]) -> None:
        tree = SoftTree(state["mean"].numel(), state["classes"], state["depth"])
        tree.load_state_dict(state["tree"])
        self._install(tree, state["mean"], state["std"])
        self.state = state
        self._figure: bytes | None = None

    def global_explanation(self) -> tuple[dict[str, Any], bytes]:
        leaves = self.tree.leaf_distributions().detach().cpu()
        names = self.config["class_names"]
        summary = {
            "depth": self.state["depth"],
            "fidelity": self.state["fidelity"],
            "held_out": self.state["held_out"],
            "features": self.config["features"],
            "layer": self.config["layer"] if self.config["features"] == "layer" else None,
            "leaf_distributions": tuple(tuple(round(float(v), 4) for v in q) for q in leaves),
            "leaf_classes": tuple(int(k) for k in leaves.argmax(1)),
        }
        if self._figure is None:
            title = (
                f"soft decision tree (depth {summary['depth']}, {summary['features']} features): "
                f"fidelity {100 * summary['fidelity']:.1f} % on {summary['held_out']} held-out images"
            )
            self._figure = draw_tree(self.state["node_images"], leaves, title, names)
        return summary, self._figure

    def describe(self, out: dict[str, torch.Tensor]) -> list[str]:
        names = self.config["class_names"]
        texts = []
        for b in range(out["leaf"].shape[0]):
            steps = []
            for node, d in zip(out["path"][b].tolist(), out["directions"][b].tolist()):
                p = float(out["right"][b, node])
                steps.append(f"node {node} {'right' if d else 'left'} ({p if d else 1 - p:.2f})")
            cls = int(out["prediction"][b])
            label = names[cls] if names else f"class {cls}"
            texts.append(
                " -> ".join(steps) + f" -> leaf {int(out['leaf'][b])}: {label} "
                f"(path probability {float(out['path_probability'][b]):.2f})"
            )
        return texts

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict]:
        if self.tree is None:
            raise XAIError("soft_tree is not fitted: pass fit_data (or fit it first)")
        spatial, out = self.decide(model, inputs)
        parts = self._features().contributions(spatial, self.effective_weights().to(spatial.device))
        sign = (2 * out["directions"] - 1).float().to(parts.device)
        path = out["path"].to(parts.device)
        evidence = (
            parts.gather(1, path.view(*path.shape, 1, 1).expand(-1, -1, *parts.shape[2:]))
            * sign.view(*sign.shape, 1, 1)
        ).sum(1, keepdim=True)
        summary, figure = self.global_explanation()
        extras = {
            "text": self.describe(out),
            "path": out["path"].cpu(),
            "directions": out["directions"].cpu(),
            "leaf": out["leaf"].cpu(),
            "path_probability": out["path_probability"].cpu(),
            "prediction": out["prediction"].cpu(),
            "tree": summary,
            "figures": {"tree": figure},
        }
        return evidence, extras

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        return attributions.reshape(attributions.shape[0], *attributions.shape[-2:]).clamp(min=0)
