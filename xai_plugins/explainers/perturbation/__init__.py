"""Perturbation and black-box explainers (the review's section 2.1): the network as a function to probe.

occlusion (Zeiler & Fergus), meaningful_perturbation (Fong & Vedaldi), rise (Petsiuk et al.), lime
(Ribeiro et al.), kernel_shap and gradient_shap (Lundberg & Lee). Every method evaluates its windows,
masks or samples in internal batches of ``batch_size`` model inputs.
"""

from xai_plugins import hookimpl

from .gradient_shap import GradientShap
from .kernel_shap import KernelShap
from .lime import Lime
from .meaningful import MeaningfulPerturbation
from .occlusion import Occlusion
from .rise import RISE

__all__ = ["Occlusion", "MeaningfulPerturbation", "RISE", "Lime", "KernelShap", "GradientShap"]


@hookimpl
def xai_explainers():
    return [Occlusion, MeaningfulPerturbation, RISE, Lime, KernelShap, GradientShap]
