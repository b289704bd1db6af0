"""Explainers made for vision transformers: attention rollout and transformer attribution."""

from xai_plugins import hookimpl
from xai_plugins.explainers.transformer.chefer import TransformerAttribution
from xai_plugins.explainers.transformer.rollout import AttentionRollout


@hookimpl
def xai_explainers():
    return [AttentionRollout, TransformerAttribution]
