"""The deployment gate on the registry: ``xai gate``, ``xai promote`` and the alias guard.

MLflow webhooks cannot block an action, so the gate is enforced here: an alias is set only for a
version whose pipeline verdict passed (the ``xai.gate`` tag *and* the ``gate.json`` verdict of the
version's run, ``xai.run_id``). The last alias holder that passed is remembered on the registered
model (tag ``xai.alias.<alias>``); the optional guard moves an alias that someone set on a version
that did not pass back to that holder (or removes it) and tags the version with why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from core.errors import XAIError
from registry import runlog
from registry.names import check_alias, check_name, check_version

log = logging.getLogger("xai.registry")


class GateRefused(XAIError):
    """Promotion refused because the gate did not pass (exit status 1)."""

    exit_code = 1


@dataclass
class GateState:
    name: str
    version: str
    status: str  # passed | failed | error | pending | unknown
    verdict: dict[str, Any] | None = None
    run_id: str | None = None
    reason: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed" and bool(self.verdict and self.verdict.get("passed") is True)

    @property
    def exit_code(self) -> int:
        """0 passed, 1 failed, 2 error / not evaluated (for CI/CD)."""
        return 0 if self.passed else 1 if self.status == "failed" else 2


def version_gate(client: Any, name: str, version: str) -> GateState:
    """What the registry says about a version's gate (raises XAIError for an unknown version)."""
    from mlflow.exceptions import MlflowException

    name, version = check_name(name), check_version(version)
    try:
        mv = client.get_model_version(name, version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            raise XAIError(f"model version {name} {version} does not exist") from None
        raise
    tags = dict(mv.tags or {})
    status, run_id = tags.get("xai.gate"), tags.get("xai.run_id")
    if tags.get("xai.status") != "done" or not status or not run_id:
        why = tags.get("xai.error") or f"xai.status is {tags.get('xai.status') or 'unset'}"
        return GateState(name, version, "pending", None, run_id, f"not evaluated yet ({why})", tags)
    try:
        verdict = runlog.logged_verdict(client, run_id)
    except Exception as exc:
        return GateState(
            name, version, "error", None, run_id, f"verdict of run {run_id} unreadable: {exc}", tags
        )
    if bool(verdict.get("passed")) != (status == "passed"):
        return GateState(
            name,
            version,
            "error",
            verdict,
            run_id,
            f"tag xai.gate={status} disagrees with the run's verdict",
            tags,
        )
    return GateState(name, version, status, verdict, run_id, "", tags)


def failing_checks(verdict: dict[str, Any] | None) -> list[dict[str, Any]]:
    return [c for c in (verdict or {}).get("checks") or [] if not c.get("passed")]


def table(state: GateState) -> str:
    """The verdict as core.policy's table, with the version on top."""
    head = f"{state.name} version {state.version}: gate {state.status}"
    if state.reason:
        head += f" - {state.reason}"
    if not state.verdict:
        return head
    from core.policy import format_table

    return f"{head}\n{format_table(state.verdict)}"


def promote(client: Any, name: str, version: str, alias: str = "champion") -> GateState:
    """Set ``alias`` on the version only if its gate passed; ``GateRefused`` (with the failing checks)
    otherwise."""
    alias = check_alias(alias)
    state = version_gate(client, name, version)
    if not state.passed:
        checks = failing_checks(state.verdict)
        lines = [
            f"not promoting {state.name} {state.version} to '{alias}': gate {state.status}"
            + (f" ({state.reason})" if state.reason else "")
        ]
        lines += [f"  failed check {c.get('name')}: {c.get('reason') or _check_text(c)}" for c in checks]
        raise GateRefused("\n".join(lines))
    client.set_registered_model_alias(state.name, alias, state.version)
    client.set_registered_model_tag(state.name, f"xai.alias.{alias}", state.version)
    return state


def _check_text(check: dict[str, Any]) -> str:
    return f"{check.get('metric')} = {check.get('value')} {check.get('op')} {check.get('threshold')} is false"


def guard_alias(client: Any, name: str, alias: str, version: str, guarded: tuple[str, ...]) -> str | None:
    """Undo ``alias`` -> ``version`` when the version's gate did not pass. Returns what was done."""
    if alias not in guarded:
        return None
    state = version_gate(client, name, version)
    if state.passed:
        client.set_registered_model_tag(name, f"xai.alias.{alias}", version)
        return None
    model = client.get_registered_model(name)
    previous = (model.tags or {}).get(f"xai.alias.{alias}")
    current = _alias_target(client, name, alias)
    if current != version:  # moved again meanwhile: judge the new holder when its event arrives
        return None
    if previous and previous != version and version_gate(client, name, previous).passed:
        client.set_registered_model_alias(name, alias, previous)
        action = f"alias '{alias}' moved back to version {previous}"
    else:
        client.delete_registered_model_alias(name, alias)
        action = f"alias '{alias}' removed"
    why = f"{action}: gate {state.status}" + (f" ({state.reason})" if state.reason else "")
    client.set_model_version_tag(name, version, "xai.alias_refused", why[:5000])
    log.warning("alias guard: %s %s: %s", name, version, why)
    return why


def _alias_target(client: Any, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def check_aliases(client: Any, guarded: tuple[str, ...]) -> list[str]:
    """Apply the guard to every guarded alias in the registry (the poller's catch-up)."""
    actions = []
    for model in client.search_registered_models(max_results=1000):
        for alias, version in (model.aliases or {}).items():
            if alias in guarded:
                try:
                    check_name(model.name)
                except XAIError:
                    continue
                done = guard_alias(client, model.name, alias, str(version), guarded)
                if done:
                    actions.append(f"{model.name}: {done}")
    return actions
