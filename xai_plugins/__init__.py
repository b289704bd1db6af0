"""The public plugin API of xai.

Third-party plugins (and every built-in one) use only what this package exports::

    from xai_plugins import hookimpl, Explainer

    class MyExplainer(Explainer):
        name = "my_method"
        params = {"layer": None}
        def explain(self, model, inputs, targets):
            ...

    @hookimpl
    def xai_explainers():
        return [MyExplainer]

and declare ``[project.entry-points.xai] my_plugin = "my_package.plugin"``. Helpers for hooks,
layers, passes and tensors are in ``xai_plugins.toolkit``.
"""

from core.errors import InputError, PluginError, XAIError
from core.hookspecs import hookimpl, provides
from core.passes import PassRequest
from core.plugin_api import Describer, Explainer, Metric, MetricContext, Reporter
from core.redact import redact, redact_text
from core.types import Explanation, Failure, RunResults

__all__ = [
    "hookimpl",
    "provides",
    "Explainer",
    "PassRequest",
    "Metric",
    "MetricContext",
    "Reporter",
    "Describer",
    "Explanation",
    "Failure",
    "RunResults",
    "XAIError",
    "InputError",
    "PluginError",
    "redact",
    "redact_text",
]
