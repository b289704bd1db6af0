"""The data (label) randomization test (Adebayo et al. 2018, section 3.2): the same architecture
trained from scratch on permuted labels, explained and compared with the original explanation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from xai_plugins import Explanation, MetricContext
from xai_plugins.metrics.sanity.model_randomization import ExplainFn, similarity
from xai_plugins.metrics.sanity.randomize import randomizable_layers
from xai_plugins.toolkit import structural


def train_on_permuted_labels(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[nn.Module, float]:
    """A frozen copy of ``model``'s architecture re-initialized and trained (core.train.train_model)
    on ``train_inputs`` (model-ready) with randomly permuted labels, and the accuracy it reached on
    those labels. The result depends on the architecture, data and settings only, not on the
    model's weights: it is kept in the model's session (``core.session``, structural), so every
    method of a run shares one training."""

    key = (
        tuple(train_inputs.shape),
        float(train_inputs.double().sum()),
        float(train_inputs.double().square().sum()),
        int(train_labels.sum()),
        epochs,
        lr,
        batch_size,
        seed,
    )
    return structural(
        model,
        ("sanity.retrained", key),
        lambda: _retrained(model, train_inputs, train_labels, epochs, lr, batch_size, seed),
    )


def _retrained(
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[nn.Module, float]:
    from xai_plugins.toolkit import Preprocess, train_model

    net = copy.deepcopy(model)
    device = next(iter(net.parameters())).device
    g = torch.Generator().manual_seed(seed)
    permuted = train_labels[torch.randperm(train_labels.numel(), generator=g)]
    data = (train_inputs.to(device), permuted.to(device))
    identity = Preprocess(
        size=None,
        mean=[0.0] * train_inputs.shape[1],
        std=[1.0] * train_inputs.shape[1],
        channels=train_inputs.shape[1],
    )
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.enable_grad():  # train_model seeds the global RNG
        torch.manual_seed(seed)
        for _, m in randomizable_layers(net):
            m.reset_parameters()
        for p in net.parameters():
            p.requires_grad_(True)
        train_model(
            net, data, identity, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=False
        )
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        accuracy = float((net(data[0]).argmax(1) == data[1]).float().mean())
    return net, accuracy


def label_randomization(
    explain: ExplainFn,
    model: nn.Module,
    train_inputs: torch.Tensor,
    train_labels: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    original: Explanation,
    similarities: tuple[str, ...] | list[str] = ("spearman",),
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], Explanation, float]:
    """Data randomization test (Adebayo et al. 2018, section 3.2): explain ``inputs`` with the model
    of ``train_on_permuted_labels``; returns the per-image similarities to ``original``, the new
    explanation, and the accuracy that model reached on the permuted training labels."""
    net, accuracy = train_on_permuted_labels(model, train_inputs, train_labels, epochs, lr, batch_size, seed)
    exp = explain(net, inputs, targets)
    return {s: similarity(s, original, exp) for s in similarities}, exp, accuracy


def infer_normalization(inputs: torch.Tensor, images: torch.Tensor) -> tuple[list[float], list[float]] | None:
    """Per-channel (mean, std) with inputs = (images - mean) / std, fitted on the run's model inputs
    and its [0, 1] display images; None when they are not related that way."""
    if images is None or images.shape != inputs.shape:
        return None
    x = inputs.detach().float().cpu().transpose(0, 1).reshape(inputs.shape[1], -1)
    y = images.detach().float().cpu().transpose(0, 1).reshape(inputs.shape[1], -1)
    means, stds = [], []
    for xc, yc in zip(x, y):
        keep = (yc > 1e-4) & (yc < 1 - 1e-4)  # clamped pixels do not follow the affine map
        xc, yc = (xc[keep], yc[keep]) if keep.sum() > 10 else (xc, yc)
        var = xc.var()
        if var <= 1e-12:
            return None
        std = float(((xc - xc.mean()) * (yc - yc.mean())).mean() / var)
        mean = float(yc.mean() - std * xc.mean())
        if std <= 0 or float((xc * std + mean - yc).abs().max()) > 1e-2:
            return None
        means.append(mean)
        stds.append(std)
    return means, stds


def training_data(context: MetricContext, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor] | str:
    """(model-ready inputs, labels) to retrain on: ``context.data`` ((inputs, labels) ready for the
    model, or a ShapesData / object with ``images`` in [0, 1] and ``labels``), else freshly generated
    `shapes`; [0, 1] images are normalized as the run's inputs are. A string says why there is none."""
    data = context.data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return torch.as_tensor(data[0]).float(), torch.as_tensor(data[1]).long()
    results = context.results
    norm = infer_normalization(context.inputs, results.images) if results is not None else None
    if data is not None and hasattr(data, "images") and hasattr(data, "labels"):
        images, labels = data.images.float(), data.labels.long()
    else:
        b, c, h, w = context.inputs.shape
        if c != 3 or h != w or h < 16:
            return "no training data (context.data) and the inputs do not fit `shapes` images"
        from xai_plugins.toolkit import make_shapes

        shapes = make_shapes(samples, size=h, seed=seed)
        images, labels = shapes.images, shapes.labels
    if norm is None:
        return "cannot tell how the model's inputs are normalized (give context.data as (inputs, labels))"
    mean = torch.tensor(norm[0]).view(1, -1, 1, 1)
    std = torch.tensor(norm[1]).view(1, -1, 1, 1)
    return (images - mean) / std, labels
