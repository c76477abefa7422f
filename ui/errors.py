"""Turn package errors into readable messages next to the input that caused them (never a traceback).

Only the errors that mean "bad input" are caught: ``UserError`` subclasses (EstimatorError, AdvisorError,
RunnerError) and pydantic's ``ValidationError``. Anything else is a bug and is left to surface.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import streamlit as st
from pydantic import ValidationError

from ftcore.errors import UserError, format_validation_error

T = TypeVar("T")


def message_of(exc: BaseException) -> str:
    """The readable text of a user-facing error."""
    if isinstance(exc, ValidationError):
        return format_validation_error(exc)
    return str(exc)


def attempt(fn: Callable[..., T], *args: Any, where=None, **kwargs: Any) -> tuple[T | None, str | None]:
    """Call ``fn``; on bad input show the message in ``where`` (a container; default: here) and return it.

    Returns ``(value, None)`` on success and ``(None, message)`` when the package rejected the input.
    """
    try:
        return fn(*args, **kwargs), None
    except (UserError, ValidationError) as exc:
        msg = message_of(exc)
        show(msg, where=where, field=getattr(exc, "field", None))
        return None, msg


def show(message: str, *, where=None, field: str | None = None) -> None:
    """Show one error message (multi-line messages keep their lines)."""
    target = where if where is not None else st
    prefix = f"**{field}**: " if field and not message.startswith(field) else ""
    target.error(prefix + message.replace("\n", "  \n"), icon=":material/error:")
