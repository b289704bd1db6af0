"""Surrogate explainers: an interpretable model distilled from the network (``soft_tree``)."""

from xai_plugins import hookimpl

from .soft_tree import SoftDecisionTree

__all__ = ["SoftDecisionTree"]


@hookimpl
def xai_explainers():
    return [SoftDecisionTree]
