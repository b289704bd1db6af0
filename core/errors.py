"""Errors that the command line turns into one clear line on stderr and a non-zero exit."""

from __future__ import annotations


def one_line(text: object) -> str:
    """``text`` on one line: newlines and other control characters escaped (``\\n``), so a file
    name or a plugin's message cannot forge a second ``error:`` line."""
    out = []
    for ch in str(text):
        if ch in "\n\r":
            out.append(repr(ch)[1:-1])
        elif not ch.isprintable() and ch != "\t":
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


class XAIError(Exception):
    """A user-facing error: its message is shown as is, without a traceback."""

    exit_code = 2


class UnknownNameError(XAIError):
    """An unknown method, metric, reporter, describer or parameter name."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]):
        self.kind, self.name, self.known = kind, name, sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known) or '(none)'}")


class InputError(XAIError):
    """Bad input data: an image that cannot be read, a target out of range, ..."""


class ModelError(XAIError):
    """A model that does not load or does not behave like a classifier (B x classes output)."""


class PluginError(XAIError):
    """A plugin broke its contract (raised, timed out, wrong shape, NaN)."""

    def __init__(self, plugin: str, kind: str, message: str):
        self.plugin, self.kind, self.message = plugin, kind, message
        super().__init__(f"plugin {plugin!r} failed ({kind}): {message}")

    def __reduce__(self) -> tuple:
        return type(self), (self.plugin, self.kind, self.message)


class PluginTimeout(BaseException):
    """Raised asynchronously inside a plugin thread that ran past its time limit."""
