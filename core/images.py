"""Loading a user's images: one folder per class, or a flat folder, through the model's own
preprocessing. A bad file gives a one-line reason and is skipped; the good ones are kept."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from core.errors import InputError
from core.preprocess import Preprocess

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
MAX_PIXELS = 40_000_000  # larger files are refused (decompression bombs, accidental huge scans)
MIN_SIDE = 8


@dataclass
class ImageSet:
    images: torch.Tensor  # N x C x H x W in [0, 1], resized to the model's size
    names: list[str]
    labels: torch.Tensor | None  # from class folders, when the folder names match class names
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"name", "reason"}


def load_image(path: Path, preprocess: Preprocess, convert: bool = False) -> torch.Tensor:
    """Read one file into a C x H x W tensor in [0, 1] at the model's size, or raise InputError."""
    if path.is_symlink() and not path.exists():
        raise InputError(f"{path.name}: broken link (points to {str(path.readlink())!r})")
    if not path.is_file():
        raise InputError(f"{path.name}: not a file")
    if path.stat().st_size == 0:
        raise InputError(f"{path.name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img: Image.Image = opened
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise InputError(
                        f"{path.name}: image is too large ({w}x{h} px; at most {MAX_PIXELS:,} pixels)"
                    )
                if min(w, h) < MIN_SIDE:
                    raise InputError(
                        f"{path.name}: image is too small ({w}x{h} px; at least {MIN_SIDE} px a side)"
                    )
                img.load()
                mode = img.mode
                expected = "RGB" if preprocess.channels == 3 else "L"
                if mode != expected:
                    if not convert:
                        what = {
                            "L": "grayscale",
                            "LA": "grayscale with alpha",
                            "RGBA": "RGBA",
                            "P": "palette",
                            "1": "1-bit",
                            "CMYK": "CMYK",
                            "I": "32-bit integer",
                            "F": "float",
                        }.get(mode, mode)
                        raise InputError(
                            f"{path.name}: image is {what} but the model expects "
                            f"{preprocess.channels}-channel {expected}; convert it or pass --convert"
                        )
                    img = _wide_gray(img) if mode in _WIDE_GRAY else img.convert(expected)
                if preprocess.hw is not None and (h, w) != preprocess.hw:
                    img = img.resize((preprocess.hw[1], preprocess.hw[0]), Image.Resampling.BILINEAR)
                arr = np.asarray(img, dtype=np.float32)
                if img.mode == "F":  # a wide grayscale image, already scaled to [0, 1]
                    arr = np.clip(arr, 0.0, 1.0)
                    if expected == "RGB":
                        arr = np.repeat(arr[..., None], 3, axis=2)
                else:
                    arr = arr / 255.0
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{path.name}: not a readable image ({type(exc).__name__})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path.name}: corrupt or truncated image ({first})") from None
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


_WIDE_GRAY = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # 16/32-bit and float grayscale modes


def _wide_gray(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as a float ("F") image in [0, 1], scaled by its bit
    depth (PIL's own conversion to 8 bits clips 16-bit values, turning most pixels white)."""
    arr = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        top = 65535.0
    elif img.mode == "I":  # 16-bit files often open as 32-bit "I": scale by the depth their values fit
        peak = float(arr.max()) if arr.size else 0.0
        top = 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 4294967295.0
        arr = arr - min(0.0, float(arr.min()))
    else:  # float: [0, 1] as is, else its own range
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr, top = (arr, 1.0) if lo >= 0 and hi <= 1 else (arr - lo, max(hi - lo, 1e-12))
    return Image.fromarray((np.nan_to_num(arr) / top).astype(np.float32), mode="F")


def find_images(folder: Path) -> list[tuple[Path, str | None]]:
    """(file, class folder name or None) for a flat folder or one subfolder per class."""
    if not folder.exists():
        raise InputError(f"image folder {str(folder)!r} does not exist")
    if folder.is_file():
        return [(folder, None)]
    found: list[tuple[Path, str | None]] = []
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            for f in sorted(entry.iterdir()):  # not only files: a broken link is reported, not dropped
                if not f.is_dir() and f.suffix.lower() in IMAGE_SUFFIXES:
                    found.append((f, entry.name))
        elif entry.suffix.lower() in IMAGE_SUFFIXES:
            found.append((entry, None))
    if not found:
        raise InputError(f"no images in {str(folder)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def load_folder(
    folder: str | Path,
    preprocess: Preprocess,
    class_names: list[str] | None = None,
    convert: bool = False,
    limit: int | None = None,
) -> ImageSet:
    """Load every image under ``folder``; bad files are listed in ``skipped`` with a reason."""
    folder = Path(folder)
    if preprocess.hw is None:
        raise InputError(
            "the model's preprocessing gives no image size; images of different sizes "
            "cannot be batched: pass --preprocess with a size"
        )
    files = find_images(folder)
    if limit:
        files = files[:limit]
    images, names, labels, skipped = [], [], [], []
    for path, cls in files:
        name = str(path.relative_to(folder)) if path != folder else path.name
        try:
            images.append(load_image(path, preprocess, convert))
        except InputError as exc:
            skipped.append({"name": name, "reason": str(exc)})
            continue
        names.append(name)
        labels.append(class_names.index(cls) if class_names and cls in class_names else -1)
    if not images:
        return ImageSet(torch.empty(0, preprocess.channels, *preprocess.hw), [], None, skipped)
    label_tensor = torch.tensor(labels) if labels and all(v >= 0 for v in labels) else None
    return ImageSet(torch.stack(images), names, label_tensor, skipped)


def save_png(array01: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write an H x W or C x H x W / H x W x C image in [0, 1] as PNG."""
    arr = array01.detach().cpu().numpy() if isinstance(array01, torch.Tensor) else np.asarray(array01)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    img = Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
