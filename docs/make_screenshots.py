"""The explorer's screenshots in docs/img/ (headless Chromium with Playwright, ``tests/registry_browser``).

    xai ui                # prints http://127.0.0.1:PORT/?token=T
    python docs/make_screenshots.py http://127.0.0.1:PORT/?token=T --model shapes-cnn --a 1 --b 2

Each page is shot at 1100 px wide (its top 1400 px); the DeConvolve and PV pages after pressing Explain.
Each PNG is quantized to 256 colours (Pillow) so that it stays small."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def shrink(path: Path) -> int:
    """Re-encode ``path`` with a 256-colour palette; its size in bytes."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    from registry_browser import page_screenshots

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="the address `xai ui` printed (with its token)")
    p.add_argument("--model", required=True)
    p.add_argument("--a", required=True, help="the older version")
    p.add_argument("--b", required=True, help="the newer version")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    a = p.parse_args(argv)
    if "/?token=" not in a.url:
        p.error("the url must be the one `xai ui` printed, with ?token=")
    base, token = a.url.split("/?token=")
    m = f"/m/{a.model}"
    shots = {
        "ui-registry": ("/", False),
        "ui-version": (f"{m}/{a.b}", False),
        "ui-compare": (f"{m}/compare?a={a.a}&b={a.b}", False),
        "ui-deconvolve": (f"{m}/{a.b}/deconvolve", True),
        "ui-pv": (f"{m}/{a.b}/pv", True),
    }
    report = page_screenshots(base, token, shots, a.out)
    for name in shots:
        print(
            f"{a.out / (name + '.png')}: {shrink(a.out / (name + '.png')) // 1024} KB  {report['shots'][name]!s:.80}"
        )
    if report["errors"]:
        print("page errors:", *report["errors"], sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
