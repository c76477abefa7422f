"""The advisor's own error type: bad answers, named by field, with the fix."""

from __future__ import annotations

from ftcore.errors import UserError


class AdvisorError(UserError):
    """A problem with the answers (or the rule file): the message names the field and the fix."""
