"""The registry's names are validated by :mod:`core.names` (one validator for every layer)."""

from core.names import (
    ALIAS_RE,
    NAME_RE,
    VERSION_RE,
    InvalidNameError,
    ModelRef,
    check_alias,
    check_name,
    check_version,
    parse_models_uri,
)

__all__ = [
    "ALIAS_RE",
    "NAME_RE",
    "VERSION_RE",
    "InvalidNameError",
    "ModelRef",
    "check_alias",
    "check_name",
    "check_version",
    "parse_models_uri",
]
