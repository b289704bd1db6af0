"""params.yaml of a pipeline workspace: read it, write it atomically, and list model versions in it.

The versions live in a dict keyed by a safe key (``shapes-cnn-v1``) so that ``foreach`` in dvc.yaml
gives one stage group per version (``explain@shapes-cnn-v1``). Names and versions come from outside
(webhooks, the registry): only safe characters are accepted, so neither can escape ``xai-runs/``.
Every write holds the workspace lock (:mod:`pipelines.lock`), the same one ``run_version`` holds
while DVC runs, so params.yaml never changes under a running ``dvc repro``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from core.errors import InputError
from core.names import check_name, check_version
from pipelines.lock import workspace_lock

PARAMS_FILE = "params.yaml"
# one validator for names from outside, shared with the registry loop and the explorer
validate_name = check_name
validate_version = check_version


def version_key(name: str, version: Any) -> str:
    """The foreach key of a version: ``<name>-v<version>`` with every character but ``[A-Za-z0-9_-]``
    replaced by ``_`` (a dot would break DVC's dotted parameter paths)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{validate_name(name)}-v{validate_version(version)}")


def read_params(workspace: str | Path) -> dict[str, Any]:
    """The workspace's params.yaml as a dict (``versions`` always present)."""
    path = Path(workspace) / PARAMS_FILE
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping at the top level")
    data["versions"] = data.get("versions") or {}
    if not isinstance(data["versions"], dict):
        raise InputError(f"{path}: 'versions' must be a mapping of key -> {{name, version, uri}}")
    return data


def _header(path: Path) -> str:
    """The comment block at the top of the file (kept when the file is rewritten)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line)
    return "".join(head)


def write_params(workspace: str | Path, params: dict[str, Any]) -> Path:
    """Write params.yaml atomically, keeping the key order and the leading comment block."""
    path = Path(workspace) / PARAMS_FILE
    tmp = path.with_name(f".{PARAMS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(_header(path) + yaml.safe_dump(params, sort_keys=False, default_flow_style=False))
    tmp.replace(path)
    return path


def version_entry(params: dict[str, Any], key: str) -> dict[str, str]:
    """The validated ``{name, version, uri}`` of ``key`` (an error names the known keys)."""
    entry = params.get("versions", {}).get(key)
    if not isinstance(entry, dict):
        known = ", ".join(params.get("versions", {})) or "none"
        raise InputError(f"no version {key!r} in params.yaml (known: {known})")
    name, version = validate_name(entry.get("name")), validate_version(entry.get("version"))
    if version_key(name, version) != key:
        raise InputError(
            f"params.yaml: version key {key!r} does not match {name} {version} "
            f"(expected {version_key(name, version)!r})"
        )
    return {"name": name, "version": version, "uri": str(entry.get("uri") or f"models:/{name}/{version}")}


def _merge(params: dict[str, Any], name: str, version: Any, uri: str | None) -> tuple[str, bool]:
    key = version_key(name, version)
    version = validate_version(version)
    current = params["versions"].get(key)
    if current is not None and (current.get("name"), str(current.get("version"))) != (name, version):
        raise InputError(f"version key {key!r} already names {current.get('name')} {current.get('version')}")
    if uri is None:
        uri = (current or {}).get("uri") or f"models:/{name}/{version}"
    entry = {"name": name, "version": version, "uri": str(uri)}
    changed = current != entry
    params["versions"][key] = entry
    return key, changed


def add_version(workspace: str | Path, name: str, version: Any, uri: str | None = None) -> str:
    """Add (or re-point) one version; returns its key. The file is rewritten only on a change."""
    with workspace_lock(workspace):
        params = read_params(workspace)
        key, changed = _merge(params, name, version, uri)
        if changed:
            write_params(workspace, params)
        return key


def write_versions(workspace: str | Path, versions: list[dict[str, Any]], replace: bool = False) -> list[str]:
    """Write the registry's versions (dicts with ``name``, ``version``, optional ``uri``) into
    params.yaml for the foreach; returns their keys. Versions already listed are kept unless
    ``replace`` (then the list becomes exactly ``versions``; outputs on disk are left alone)."""
    with workspace_lock(workspace):
        params = read_params(workspace)
        before = dict(params["versions"])
        if replace:
            params["versions"] = {}
        keys = [_merge(params, v["name"], v["version"], v.get("uri"))[0] for v in versions]
        if params["versions"] != before:
            write_params(workspace, params)
        return keys
