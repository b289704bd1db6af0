"""Reference models and safe model loading.

- ``deconvolve_cnn``: the DeConvolve paper's CNN (3 conv layers 32/3x3, 64/5x5, 128/3x3, 2 max-pools,
  global average pooling, linear classifier) - also a valid CAM (Zhou et al.) architecture.
- ``resnet18``: torchvision's ResNet-18 with our class count and a small-image stem (3x3 stride-1
  conv, no max-pool), keeping BatchNorm, residual adds and the reused in-place ReLU.

Checkpoints are plain dicts of tensors and primitives, loaded with ``weights_only=True``: loading a
pickled module (which can run arbitrary code) needs an explicit ``unsafe=True``.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ModelError
from core.preprocess import Preprocess

CHECKPOINT_FORMAT = "xai-checkpoint/1"
ARCHITECTURES = ("deconvolve_cnn", "resnet18")
MAX_CLASSES = 100_000  # a checkpoint's class count beyond this is an error, not a memory blow-up
TIMM_PREFIX = "timm:"  # "timm:<model name>": any timm architecture (the optional extra ``timm``)


class DeConvolveCNN(nn.Module):
    """The reference CNN of the DeConvolve paper (section 4.1), ending in GAP + linear."""

    def __init__(self, num_classes: int = 4, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def resnet18_small(num_classes: int = 4) -> nn.Module:
    """torchvision ResNet-18 with a stem for 32-64 px images."""
    import torchvision  # here, not at the top: stages with a DeConvolve CNN never pay its import

    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def known_architecture(arch: str | None) -> bool:
    """Whether ``build_model`` can rebuild ``arch`` (a reference model or ``timm:<name>``)."""
    return bool(arch) and (arch in ARCHITECTURES or str(arch).startswith(TIMM_PREFIX))


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelError(
            "timm architectures need the optional extra: pip install 'xai-mlops[timm]'"
        ) from None
    return timm


def build_model(arch: str, num_classes: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A reference model, or ``timm:<name>`` built by timm offline (``pretrained=False``) with
    ``arch_kwargs`` (img_size, depth, embed_dim, ...) as given to ``timm.create_model``."""
    if arch == "deconvolve_cnn":
        return DeConvolveCNN(num_classes)
    if arch == "resnet18":
        return resnet18_small(num_classes)
    if arch.startswith(TIMM_PREFIX):
        name, timm = arch[len(TIMM_PREFIX) :], _timm()
        if not timm.is_model(name):
            raise ModelError(f"unknown timm architecture {name!r}")
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=num_classes, **dict(arch_kwargs or {})
            )
        except TypeError as exc:
            raise ModelError(f"timm architecture {name!r}: {exc}") from None
    raise ModelError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}, {TIMM_PREFIX}<name>")


def timm_preprocess(model: nn.Module) -> Preprocess:
    """timm's own preprocessing of a timm model (mean, std, input size from its pretrained_cfg;
    the size its patch embedding was built for, when it has one), to store with the model."""
    config = _timm().data.resolve_data_config({}, model=model)
    channels, height, width = config["input_size"]
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is not None:  # a transformer built for another size than its config's (img_size=...)
        height, width = (built, built) if isinstance(built, int) else tuple(built)
    return Preprocess(
        size=(int(height), int(width)),
        mean=[float(v) for v in config["mean"]],
        std=[float(v) for v in config["std"]],
        channels=int(channels),
    )


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    arch: str,
    preprocess: Preprocess,
    class_names: list[str],
    meta: dict[str, Any] | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Write a weights-only checkpoint holding everything needed to rebuild and feed the model
    (``arch_kwargs``: the constructor arguments of a ``timm:`` architecture, primitives only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": len(class_names),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "preprocess": preprocess.as_dict(),
        "class_names": list(class_names),
        "meta": dict(meta or {}),
        "arch_kwargs": dict(arch_kwargs or getattr(model, "xai_arch_kwargs", None) or {}),
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


class LoadedModel:
    """A model with what is known about feeding and reading it."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess | None,
        class_names: list[str] | None,
        meta: dict[str, Any] | None = None,
        arch: str | None = None,
    ):
        self.model, self.preprocess, self.class_names = model, preprocess, class_names
        self.meta, self.arch = meta or {}, arch


def from_checkpoint_dict(payload: dict[str, Any], source: str = "checkpoint") -> LoadedModel:
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(
            f"{source}: not an xai checkpoint (a bare state_dict has no architecture); "
            "save with `xai train`, core.models.save_checkpoint, or TorchScript"
        )
    arch, num_classes, state = payload.get("arch"), payload.get("num_classes"), payload.get("state_dict")
    if not isinstance(arch, str) or not (arch in ARCHITECTURES or arch.startswith(TIMM_PREFIX)):
        raise ModelError(
            f"{source}: checkpoint 'arch' must be one of {', '.join(ARCHITECTURES)} or "
            f"{TIMM_PREFIX}<name>, not {str(arch)[:60]!r}"
        )
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or not 1 <= num_classes <= MAX_CLASSES
    ):
        raise ModelError(
            f"{source}: checkpoint 'num_classes' must be a whole number 1-{MAX_CLASSES}, "
            f"not {str(num_classes)[:40]!r}"
        )
    if not isinstance(state, dict):
        raise ModelError(f"{source}: checkpoint 'state_dict' must be a mapping of tensors")
    arch_kwargs = payload.get("arch_kwargs")
    if arch_kwargs is not None and not isinstance(arch_kwargs, dict):
        raise ModelError(f"{source}: checkpoint 'arch_kwargs' must be a mapping")
    model = build_model(arch, num_classes, arch_kwargs)
    if arch_kwargs:
        model.xai_arch_kwargs = dict(arch_kwargs)  # type: ignore[assignment]  # written back when saved again
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{source}: weights do not fit architecture {arch} with {num_classes} classes "
            f"({state_dict_mismatch(str(exc))})"
        ) from None
    pre = Preprocess.from_dict(payload["preprocess"]) if payload.get("preprocess") else None
    return LoadedModel(model.eval(), pre, payload.get("class_names"), payload.get("meta"), payload["arch"])


def state_dict_mismatch(message: str) -> str:
    """torch's multi-line ``load_state_dict`` error in one line: what is missing, unexpected, or
    of another shape (counts and the first name of each)."""
    import re

    parts = []
    for kind in ("Missing key(s)", "Unexpected key(s)"):
        found = re.search(re.escape(kind) + r' in state_dict: ([^.]*(?:\.[^ ."][^.]*)*)\.', message)
        if found:
            keys = re.findall(r'"([^"]+)"', found.group(1))
            parts.append(f"{kind.split()[0].lower()} {len(keys)} key(s), e.g. {keys[0]}" if keys else kind)
    shapes = re.findall(r"size mismatch for ([^:]+):", message)
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape, e.g. {shapes[0]}")
    return "; ".join(parts) or message.strip().splitlines()[0][:200]


def load_model(path: str | Path, unsafe: bool = False) -> LoadedModel:
    """Load an xai checkpoint, a TorchScript file, or (``unsafe=True`` only) a pickled module."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise ModelError(f"model file {str(path)!r} is empty")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
            try:
                with (
                    warnings.catch_warnings()
                ):  # TorchScript is deprecated upstream but still what users ship
                    warnings.simplefilter("ignore", FutureWarning)
                    model = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                detail = lines[0][:200] if lines else type(exc).__name__
                raise ModelError(f"cannot load TorchScript model {str(path)!r}: {detail}") from None
            return LoadedModel(model.eval(), None, None)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text:  # a real pickle that names classes: arbitrary code
            if not unsafe:
                raise ModelError(
                    f"model file {str(path)!r} contains pickled Python objects, which can run "
                    "arbitrary code when loaded; pass --unsafe-load only if you trust it"
                ) from None
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as exc2:
                raise ModelError(
                    f"cannot load model file {str(path)!r}: {type(exc2).__name__}: {exc2}"
                ) from None
            if isinstance(obj, nn.Module):
                return LoadedModel(obj.eval(), None, None)
            if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
                return from_checkpoint_dict(obj, str(path))
            raise ModelError(f"model file {str(path)!r} holds a {type(obj).__name__}, not a model") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = next(
            (ln for ln in lines if ln.startswith("Unsupported")), lines[0] if lines else type(exc).__name__
        )
        raise ModelError(
            f"cannot load model file {str(path)!r}: not an xai checkpoint, TorchScript file or "
            f"PyTorch pickle ({detail[:120]})"
        ) from None
    if isinstance(payload, dict):
        return from_checkpoint_dict(payload, str(path))
    raise ModelError(f"model file {str(path)!r} holds a {type(payload).__name__}, not a model")
