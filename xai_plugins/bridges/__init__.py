"""Bridges that expose other libraries' attribution classes as xai explainers."""

import re


def snake(name: str) -> str:
    """CamelCase class name -> snake_case (``LayerConductance`` -> ``layer_conductance``)."""
    parts = []
    for part in name.split("_"):
        s = re.sub(r"(?<=[A-Z])(?=[A-Z][a-z])", "_", part)
        parts.append(re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", s).lower())
    return "_".join(p for p in parts if p)
