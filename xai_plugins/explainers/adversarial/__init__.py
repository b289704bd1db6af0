"""Adversarial explainers (the review's section 6): explanations from adversarial examples
(``adversarial``) and from a similar / adversarial generator pair (``adversarial_generators``)."""

from xai_plugins import hookimpl

from .examples import AdversarialExplainer
from .generators import AdversarialGenerators

__all__ = ["AdversarialExplainer", "AdversarialGenerators"]


@hookimpl
def xai_explainers():
    return [AdversarialExplainer, AdversarialGenerators]
