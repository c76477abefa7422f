"""Errors raised by the runner. Each carries a ``kind`` (the result.json field) and a ``fix``."""

from __future__ import annotations

from ftcore.errors import UserError
from runner import exitcodes


class RunnerError(UserError):
    """A run cannot start or continue because of something the user can change.

    ``kind`` is one of the result.json kinds (bad_spec, dataset, missing_dependency, resume_refused, ...);
    ``fix`` says what to do. The worker turns it into result.json and the matching exit code.
    """

    def __init__(self, message: str, *, field: str | None = None, kind: str = "bad_spec", fix: str = ""):
        super().__init__(message, field=field, fix=fix)
        self.kind = kind

    @property
    def exit_code(self) -> int:
        return exitcodes.KIND_TO_CODE.get(self.kind, exitcodes.ERROR)
