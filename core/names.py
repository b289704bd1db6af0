"""Model names, versions, aliases and ``models:/`` URIs: the one validator the registry loop, the
pipelines and the explorer share.

Names end up in paths (``xai-runs/<model>/<version>/``), DVC ``foreach`` keys and MLflow run names,
so anything that could escape a directory or be read as a path or option is refused, whatever MLflow
itself would accept: a name is 1-100 characters from ``[A-Za-z0-9_.-]``, starts with a letter or
digit and holds no ``..``; a version is a positive integer; an alias is MLflow's alias syntax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import InputError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
VERSION_RE = re.compile(r"[1-9][0-9]{0,9}")
ALIAS_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")


class InvalidNameError(InputError):
    """A model name, version or alias the registry loop refuses."""


def check_name(name: object) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"model name {str(name)[:120]!r} is not accepted: use 1-100 characters from "
            "A-Z a-z 0-9 _ . - starting with a letter or digit, without '..'"
        )
    return name


def check_version(version: object) -> str:
    text = str(version) if isinstance(version, int) and not isinstance(version, bool) else version
    if not isinstance(text, str) or not VERSION_RE.fullmatch(text):
        raise InvalidNameError(
            f"model version {str(version)[:40]!r} is not accepted: expected a positive integer"
        )
    return text


def check_alias(alias: object) -> str:
    if not isinstance(alias, str) or not ALIAS_RE.fullmatch(alias) or re.fullmatch(r"[vV]\d+", alias):
        raise InvalidNameError(
            f"alias {str(alias)[:60]!r} is not accepted: letters, digits, _ and - "
            "(not of the reserved form v<number>)"
        )
    return alias


@dataclass(frozen=True)
class ModelRef:
    """``models:/name/version`` (version set) or ``models:/name@alias`` (alias set)."""

    name: str
    version: str | None = None
    alias: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}" if self.version else f"models:/{self.name}@{self.alias}"


def parse_models_uri(uri: str) -> ModelRef:
    """Parse and validate a registry URI; anything else is an InputError naming the forms accepted."""
    if not uri.startswith("models:/"):
        raise InvalidNameError(f"{uri!r} is not a models:/ URI")
    rest = uri[len("models:/") :]
    if "@" in rest and "/" not in rest:
        name, alias = rest.split("@", 1)
        return ModelRef(check_name(name), alias=check_alias(alias))
    if rest.count("/") == 1:
        name, version = rest.split("/")
        return ModelRef(check_name(name), version=check_version(version))
    raise InvalidNameError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
