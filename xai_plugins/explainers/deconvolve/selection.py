"""Per image: each filter's evidence for the explained class and the most influential filters
(DeConvolve, section 3.4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xai_plugins.toolkit import LayerCapture, normalize_maps, resolve_layer, upsample


@dataclass
class Evidence:
    """Feature maps and filter evidence of one batch at one layer.

    activations: B x K x h x w, ReLU of the layer output (what the next layer sees);
    scores: B x K, Algorithm 1's score of each filter for each image's class;
    evidence: B x K, the score times the filter's mean activation on the image (``rank="evidence"``)
    or the score itself (``rank="score"``);
    correlation: B x K, the constant sweep's correlation with each image's class (section 3.2), when known.
    """

    layer: str
    activations: torch.Tensor
    scores: torch.Tensor
    evidence: torch.Tensor
    correlation: torch.Tensor | None = None

    def top(self, k: int, positive: bool) -> list[list[int]]:
        """Per image, up to ``k`` filters with the largest positive (or most negative) evidence."""
        e = self.evidence if positive else -self.evidence
        k = max(0, min(int(k), e.shape[1]))
        if k == 0:
            return [[] for _ in range(e.shape[0])]
        values, idx = e.topk(k, dim=1)
        return [
            [int(f) for f, v in zip(row_i, row_v) if v > 0]
            for row_i, row_v in zip(idx.tolist(), values.tolist())
        ]

    def filter_heat(self, i: int, filters: list[int], size: tuple[int, int]) -> torch.Tensor:
        """The chosen filters' maps on image ``i``, each scaled into [0, 1], at ``size`` (F x H x W)."""
        maps = self.activations[i, filters].float()
        return normalize_maps(upsample(maps, size)).clamp(0, 1)

    def group_heat(self, groups: list[list[int]], size: tuple[int, int]) -> torch.Tensor:
        """Per image, the |evidence|-weighted sum of its group's maps, scaled into [0, 1] (B x H x W)."""
        b, k = self.evidence.shape
        weights = torch.zeros(b, k, dtype=self.activations.dtype, device=self.activations.device)
        for i, group in enumerate(groups):
            if group:
                weights[i, group] = self.evidence[i, group].abs().to(weights.dtype)
        heat = (weights[:, :, None, None] * self.activations).sum(dim=1)
        return normalize_maps(upsample(heat.float(), size)).clamp(0, 1)

    def aggregate_map(self) -> torch.Tensor:
        """sum_k S[k, c] * ReLU(A_k): the aggregated filter evidence, B x 1 x h x w (signed)."""
        return (self.scores.to(self.activations.dtype)[:, :, None, None] * self.activations).sum(
            1, keepdim=True
        )


def layer_evidence(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    layer: str,
    score_matrix: torch.Tensor,
    rank: str = "evidence",
) -> Evidence:
    """Run the model once, capturing ``layer``; combine with the fitted K x classes scores."""
    module = resolve_layer(model, layer)[1]
    with torch.no_grad(), LayerCapture(module) as cap:
        model(inputs)
    if cap.output is None or cap.output.dim() != 4:
        raise RuntimeError(f"layer {layer!r} gave no B x K x h x w feature maps")
    acts = cap.outputs[-1].detach().clamp(min=0)  # a reused module: its last call, as elsewhere
    if acts.shape[1] != score_matrix.shape[0]:
        raise RuntimeError(
            f"layer {layer!r} has {acts.shape[1]} filters but the fitted scores have "
            f"{score_matrix.shape[0]}: refit for this model"
        )
    scores = score_matrix.to(acts.device, acts.dtype)[:, targets.to(acts.device)].T.contiguous()
    evidence = scores * acts.mean(dim=(2, 3)) if rank == "evidence" else scores.clone()
    return Evidence(layer, acts, scores, evidence)
