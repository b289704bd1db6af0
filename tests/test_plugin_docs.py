"""Every hook is documented in docs/plugins.md with its signature and an example (datasette's
rule): adding or changing a hook without documenting it fails here."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from core import hookspecs

DOCS = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("xai_") and inspect.isfunction(fn)]


def test_there_are_hooks():
    assert {
        "xai_explainers",
        "xai_metrics",
        "xai_reporters",
        "xai_describers",
        "xai_register_commands",
    } <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_with_its_signature(hook):
    section = re.search(rf"^### {hook}\n(.*?)(?=^### |^## )", DOCS, re.S | re.M)
    assert section, f"docs/plugins.md has no '### {hook}' section"
    params = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    signature = re.search(rf"def {hook}\(([^)]*)\)", section.group(1))
    assert signature, f"the {hook} section shows no signature"
    documented = [p.split(":")[0].strip() for p in signature.group(1).split(",") if p.strip()]
    assert documented == params, f"{hook}: documented {documented}, hookspec has {params}"
    assert section.group(1).count("@hookimpl") >= 2, f"{hook} needs a runnable example"
