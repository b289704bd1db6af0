"""Base classes of the public plugin API: Explainer, Metric, Reporter, Describer.

Third parties import these from ``xai_plugins``. Each class has a unique ``name`` and declares its
parameters with defaults in ``params``; an unknown parameter is an error that lists the known ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from core.errors import UnknownNameError
from core.passes import PassRequest

if TYPE_CHECKING:
    from core.passes import GradientPass
    from core.types import RunResults

# pass flags of earlier versions, mapped to ``Explainer.pass_request`` (name -> PassRequest field)
_LEGACY_PASS_FLAGS = {
    "needs_layer": "layer",
    "needs_layer_grad": "layer_grad",
    "needs_input_grad": "input_grad",
    "relu_rule": "relu_rule",
    "shared_pass": None,
}


def _request_from_flags(cls: type) -> PassRequest | None:
    """The ``pass_request`` a subclass declaring the old flags meant: its own flags over what its
    bases requested (None when it says ``shared_pass = False``, or never shared a pass)."""
    base: PassRequest | None = getattr(cls, "pass_request", None)
    shared = cls.__dict__.get("shared_pass", base is not None)
    if not shared:
        return None
    fields = {
        field: getattr(cls, flag, getattr(base or PassRequest(), field))
        for flag, field in _LEGACY_PASS_FLAGS.items()
        if field is not None
    }
    return PassRequest(**fields)


class Configurable:
    """A named plugin object whose keyword parameters are validated against ``params``."""

    name: ClassVar[str] = ""
    kind_label: ClassVar[str] = "plugin"
    params: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise UnknownNameError(
                f"parameter of {self.kind_label} {self.name!r}", unknown[0], list(self.params)
            )
        self.config: dict[str, Any] = {**self.params, **params}

    def __getattr__(self, item: str) -> Any:
        config = self.__dict__.get("config")
        if config is not None and item in config:
            return config[item]
        raise AttributeError(item)

    @classmethod
    def summary(cls) -> str:
        doc = (cls.description or cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else ""


class Explainer(Configurable):
    """An attribution method.

    Subclasses implement ``explain(model, inputs, targets)`` returning either a tensor of
    attributions (B x C x H x W in input space, or B x 1 x h x w / B x h x w for map methods, which
    the engine upsamples to the input) or a tuple ``(attributions, extras)``.

    The engine has already put the model in eval mode on the right device and restores it after;
    the explainer must remove every hook or patch it adds, even when it raises (use the helpers in
    ``xai_plugins.toolkit``). ``inputs`` never requires grad on entry: clone it when you need grads.

    Methods that can share one forward/backward declare what they need from it as
    ``pass_request = PassRequest(...)`` (layer activations and gradients, the input gradient, a
    modified ReLU backward; ``core.passes.PassRequest``) and implement ``from_pass(gradient_pass)``:
    the engine merges the requests of all methods of a run into one ``GradientPass`` per batch.
    The flags of earlier versions (``shared_pass``, ``needs_layer``, ``needs_input_grad``,
    ``relu_rule``, ``needs_layer_grad``) still work on a subclass: they are turned into its
    ``pass_request`` when the class is defined.
    """

    kind_label = "explainer"
    space: ClassVar[str] = "input"  # "input": B x C x H x W attributions; "map": B x 1 x H x W
    trainable: ClassVar[bool] = False
    # The map keeps the sign of the evidence (relevance for and against the class): reports draw
    # the attributions with a diverging colormap, zero relevance leaving the image untinted.
    signed: ClassVar[bool] = False
    # -- how the method runs: the engine and the sanity check read these three --------------------
    # None: the method explains by itself (``explain``); a request: from the shared pass.
    pass_request: ClassVar[PassRequest | None] = None
    # Each row is explained from calls of the model on exactly the rows given (no batches of its own,
    # no changed parameters): lets the sanity check explain several randomized models in one batch.
    rowwise: ClassVar[bool] = False
    # The method intercepts the model's Python modules or operations (per-layer rules, a changed
    # activation backward): a TorchScript model runs its own compiled graph, which such a method
    # cannot see into, so it is refused rather than silently answered with plain gradients. Methods
    # with a ``layer`` parameter or a ReLU rule count as such without setting it.
    python_modules: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if "pass_request" not in cls.__dict__ and any(f in cls.__dict__ for f in _LEGACY_PASS_FLAGS):
            cls.pass_request = _request_from_flags(cls)

    def explain(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Any:
        raise NotImplementedError

    def needs_python_modules(self) -> bool:
        """Whether this configured method needs the model as Python modules (see ``python_modules``)."""
        request = self.pass_request
        return (
            self.python_modules
            or (request is not None and request.relu_rule is not None)
            or "layer" in self.config
        )

    def from_pass(self, gradient_pass: GradientPass) -> Any:
        """Compute the attributions from a shared forward/backward (only with a ``pass_request``)."""
        raise NotImplementedError

    def to_map(self, attributions: torch.Tensor) -> torch.Tensor:
        """Reduce attributions to one B x H x W relevance map (before upsampling/normalizing).

        Default: input-space methods take the maximum absolute value over channels (Simonyan et
        al.); map methods keep their single channel. Override for signed methods.
        """
        if attributions.dim() == 4 and attributions.shape[1] > 1:
            return attributions.abs().amax(dim=1)
        return attributions.reshape(attributions.shape[0], *attributions.shape[-2:])

    # Trainable explainers (adversarial generators, soft trees, PV decoders, DeConvolve filter maps)
    def fit(self, model: torch.nn.Module, data: Any) -> dict[str, Any]:
        """Train on ``data`` (an iterable of (images, labels) batches) and return a state dict."""
        raise NotImplementedError

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``fit`` returned."""
        raise NotImplementedError


class Metric(Configurable):
    """An evaluation of explanations (or of the model) computed from a ``MetricContext``.

    ``compute`` returns a flat dict of JSON-serializable figures (floats, or lists for curves);
    the host prefixes keys with the metric name. ``requires`` lists what the context must hold
    ("masks", "spurious_masks", "explain" (re-explaining), "labels", "data"); a metric whose
    requirements are not met is skipped with a note, not failed. ``per_method`` False means the
    metric describes the model, not one explanation (computed once per run).
    """

    kind_label = "metric"
    requires: ClassVar[tuple[str, ...]] = ()
    per_method: ClassVar[bool] = True
    higher_is_better: ClassVar[bool | None] = None

    def compute(self, context: MetricContext) -> dict[str, Any]:
        raise NotImplementedError


class MetricContext:
    """What a metric may read: the model, the batch, one explanation, and a way to re-explain."""

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        explanation: Any = None,
        masks: torch.Tensor | None = None,
        spurious_masks: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        explain_fn: Any = None,
        data: Any = None,
        results: RunResults | None = None,
        device: torch.device | None = None,
    ):
        self.model, self.inputs, self.targets = model, inputs, targets
        self.explanation, self.masks, self.spurious_masks = explanation, masks, spurious_masks
        self.labels, self.explain_fn, self.data, self.results = labels, explain_fn, data, results
        self.device = device or inputs.device

    def explain(
        self,
        model: torch.nn.Module | None = None,
        inputs: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> Any:
        """Re-run this context's explainer (same method and parameters) on another model/input."""
        if self.explain_fn is None:
            raise RuntimeError("this metric context has no explainer to re-run")
        return self.explain_fn(
            model if model is not None else self.model,
            inputs if inputs is not None else self.inputs,
            targets if targets is not None else self.targets,
        )


class Reporter(Configurable):
    """Writes a run's results somewhere (a file under ``out_dir``, a tracking server, ...)."""

    kind_label = "reporter"

    def write(self, results: RunResults, out_dir: Path) -> Path | None:
        raise NotImplementedError


class Describer(Configurable):
    """Turns an image and a heat map into sentences (DeConvolve's text backends, section 3.4.2)."""

    kind_label = "describer"

    def describe(self, image: Any, heatmap: Any, context: dict[str, Any]) -> str:
        raise NotImplementedError
