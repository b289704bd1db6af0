"""Secret redaction: the one helper applied wherever text or configs are written (logs, the queue's
``last_error``, MLflow tags and params, results.json, reports).

Two rules (DESIGN.md "Secrets and the gate"): the password of a URI (``scheme://user:pass@host``)
becomes ``***``, and the value of any mapping key whose name contains ``key``, ``token``,
``secret`` or ``password`` (any case; text values, not numbers) becomes ``***``, recursively through
dicts, lists and tuples.
Free text is also scanned for ``name=value`` / ``"name": "value"`` pairs whose name says api_key,
access_key, secret, token or password (a bare "key" in prose, as in ``KeyError:``, is left alone).
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
SECRET_WORDS = ("key", "token", "secret", "password", "passwd")
_URI_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@'\"]*:)(?P<pw>[^@\s/'\"]+)(?=@)")
_TEXT_NAME = r"[A-Za-z0-9_\-]*(?:api[_\-]?key|access[_\-]?key|secret|token|password|passwd)[A-Za-z0-9_\-]*"
_PAIR = re.compile(
    r"(?P<head>(?P<q>[\"']?)\b" + _TEXT_NAME + r"(?P=q)\s*[:=]\s*)"
    r"(?P<value>\"[^\"]*\"|'[^']*'|[^\s,;&'\"}\]]+)",
    re.IGNORECASE,
)


PUBLIC_NAMES = frozenset({"key"})  # the project's own word for a version's key in params.yaml


def secret_name(name: Any) -> bool:
    """True for a parameter/config key that names a secret (api_key, TOKEN, db_password, ...)."""
    lowered = str(name).lower()
    return lowered not in PUBLIC_NAMES and any(word in lowered for word in SECRET_WORDS)


def redact_text(text: Any) -> str:
    """``text`` with URI passwords and ``secret_name=value`` pairs masked."""
    text = _URI_PASSWORD.sub(lambda m: m.group("head") + MASK, str(text))
    return _PAIR.sub(_mask_pair, text)


def _mask_pair(match: re.Match) -> str:
    value = match.group("value")
    quote = value[0] if value[:1] in ("'", '"') else ""
    return f"{match.group('head')}{quote}{MASK}{quote}"


def redact(value: Any, _secret: bool = False) -> Any:
    """A copy of ``value`` with secrets masked: text (and bytes) under a secret name, URI passwords in
    any string, recursively through dicts, lists and tuples. Numbers, booleans and None are kept
    (``prefix_tokens: 1`` is not a secret)."""
    if isinstance(value, dict):
        return {k: redact(v, _secret or secret_name(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, _secret) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v, _secret) for v in value)
    if isinstance(value, (str, bytes)):
        return MASK if _secret and value else redact_text(value) if isinstance(value, str) else value
    return value


class RedactingFilter(logging.Filter):
    """A logging filter that masks secrets in every record it passes (message and arguments)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        record.msg, record.args = redact_text(message), None
        return True


def install_log_redaction(*names: str) -> None:
    """Mask secrets in the records of the named loggers' handlers (root when none) - idempotent."""
    for name in names or ("",):
        logger = logging.getLogger(name)
        handlers = logger.handlers or logging.getLogger().handlers
        for handler in handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
