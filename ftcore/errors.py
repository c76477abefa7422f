"""Error types shared by every package.

A ``UserError`` is a problem with what the user gave us (a field, a file, a knob). Its message names
the field; ``fix``, when the raiser knows one, says what to do. The CLI prints both (``error: ...`` then
``fix: ...``) and exits with status 2; the app shows them next to the input.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the field (and the fix, or ``fix`` holds it on its own)."""

    def __init__(self, message: str, *, field: str | None = None, fix: str = ""):
        super().__init__(message)
        self.field = field
        self.fix = fix


def format_validation_error(exc) -> str:
    """Turn a pydantic ValidationError into one readable line per field."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "input"
        msg = err.get("msg", "invalid value")
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {msg}{shown}")
    return "\n".join(lines)
