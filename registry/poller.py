"""``xai sync``: catch up with the registry, so no version is missed while the receiver was down.

Every model version without an ``xai.status`` tag is enqueued (``all_versions``: every version,
e.g. after the pipeline configuration changed; the queue's unique key makes repeats no-ops).
A version whose name the loop refuses is tagged ``xai.status=failed`` with the reason, once.
``write_params`` also lists the registry's versions in the workspace's params.yaml
(``pipelines.params.write_versions``), for a plain ``dvc repro``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.names import InvalidNameError, check_name, check_version
from registry.queue import Queue
from registry.state import State, config_hash

log = logging.getLogger("xai.registry")


@dataclass
class SyncResult:
    enqueued: list[tuple[str, str]] = field(default_factory=list)
    already_queued: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    seen: int = 0


def model_versions(client: Any, model: str | None = None) -> Iterator[Any]:
    """Every model version in the registry (of ``model`` when given), page by page."""
    filter_string = f"name='{check_name(model)}'" if model else None
    token = None
    while True:
        page = client.search_model_versions(filter_string=filter_string, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def sync(
    client: Any,
    workspace: str | Path | None = None,
    model: str | None = None,
    all_versions: bool = False,
    write_params: bool = False,
    max_attempts: int = 5,
) -> SyncResult:
    state = State(workspace).ensure()
    queue = Queue(state.queue_db)
    config = config_hash(state.workspace)
    result = SyncResult()
    listed: list[dict[str, str]] = []
    try:
        for mv in model_versions(client, model):
            result.seen += 1
            tags = mv.tags or {}
            try:
                name, version = check_name(mv.name), check_version(mv.version)
            except InvalidNameError as exc:
                if tags.get("xai.status") != "failed":
                    client.set_model_version_tag(mv.name, mv.version, "xai.status", "failed")
                    client.set_model_version_tag(mv.name, mv.version, "xai.error", str(exc)[:5000])
                result.refused.append((str(mv.name), str(mv.version), str(exc)))
                continue
            listed.append({"name": name, "version": version, "uri": f"models:/{name}/{version}"})
            if "xai.status" in tags and not all_versions:
                continue
            job, created = queue.enqueue(name, version, config, "sync", max_attempts)
            (result.enqueued if created else result.already_queued).append((name, version))
    finally:
        queue.close()
    if write_params and listed:
        from pipelines.params import write_versions

        result.written = write_versions(state.workspace, listed)
    for name, version in result.enqueued:
        log.info("sync: enqueued %s %s", name, version)
    return result
