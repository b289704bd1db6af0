"""Shared fixtures: tiny models of every architecture kind the methods must handle, and the
reference CNNs trained on `shapes` (trained once, cached under tests/.cache keyed by the source of
the data, model and training code so a change retrains).

``XAI_TEST_MODEL_SEED`` (default 0) picks the training seed of the reference CNNs: another CPU's
floating-point sums act like another seed, so the assertions on trained models are checked against
several seeds (see tests/test_seed_stability.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("XAI_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "tests" / ".cache"
TRAIN_SIZE = 32
TEST_MODEL_SEED = int(os.environ.get("XAI_TEST_MODEL_SEED", "0"))


def _code_hash() -> str:
    h = hashlib.sha256()
    for rel in ("core/datasets.py", "core/models.py", "core/train.py"):
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()[:12]


def trained_path(watermark: str, seed: int = TEST_MODEL_SEED, arch: str = "deconvolve_cnn") -> Path:
    """The cached checkpoint of ``arch`` trained on `shapes` with ``seed`` (trained on first use)."""
    from core.train import train_reference

    CACHE.mkdir(parents=True, exist_ok=True)
    suffix = "" if seed == 0 else f"-seed{seed}"
    path = CACHE / f"{arch}-{watermark}{suffix}-{_code_hash()}.pt"
    if not path.exists():
        train_reference(arch, path, size=TRAIN_SIZE, watermark=watermark, seed=seed, progress=False)
    return path


def _trained(watermark: str, seed: int = TEST_MODEL_SEED, arch: str = "deconvolve_cnn"):
    from core.models import load_model

    return load_model(trained_path(watermark, seed, arch))


@pytest.fixture(scope="session")
def trained_cnn():
    """The DeConvolve reference CNN trained on clean `shapes` (LoadedModel: .model, .preprocess,
    .class_names, .meta['accuracy'])."""
    return _trained("none")


@pytest.fixture(scope="session")
def clever_hans_cnn():
    """The same CNN trained on Clever Hans `shapes` (the watermark gives the label away)."""
    return _trained("shortcut")


@pytest.fixture(scope="session")
def trained_cnn_path(trained_cnn) -> Path:
    return trained_path("none")


@pytest.fixture(scope="session")
def shapes_probe():
    """64 held-out clean `shapes` images (32 px) with masks, never seen in training."""
    from core.datasets import make_shapes

    return make_shapes(64, size=TRAIN_SIZE, seed=4242)


class FunctionalReLUCNN(nn.Module):
    """A small CNN that calls F.relu / torch.relu in forward (no nn.ReLU modules)."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class ReusedReLUResidualNet(nn.Module):
    """BatchNorm, a residual add and one in-place nn.ReLU module reused three times."""

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(x)) + x)
        z = self.relu(self.conv3(y))
        return self.fc(z.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.fixture
def functional_relu_cnn():
    torch.manual_seed(0)
    return FunctionalReLUCNN().eval()


@pytest.fixture
def residual_net():
    torch.manual_seed(0)
    return _randomize_bn(ReusedReLUResidualNet())


@pytest.fixture(scope="session")
def resnet18():
    import torchvision

    torch.manual_seed(0)
    return _randomize_bn(torchvision.models.resnet18(num_classes=4))


@pytest.fixture(scope="session")
def vgg11():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg11(num_classes=4).eval()


@pytest.fixture
def images32():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def images64():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


SHARED_MODELS = ("resnet18", "vgg11")


@pytest.fixture(autouse=True)
def _clear_shared_model_grads(request):
    """Session-scoped models are shared between tests: peer libraries (pytorch-grad-cam, Quantus)
    leave parameter gradients behind, so clear them after each test that used one."""
    yield
    for name in SHARED_MODELS:
        if name in request.fixturenames:
            request.getfixturevalue(name).zero_grad(set_to_none=True)
