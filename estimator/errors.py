"""The estimator's own error type: bad input (an id, a config.json, a knob), with the field and the fix."""

from __future__ import annotations

from ftcore.errors import UserError


class EstimatorError(UserError):
    """A problem with what the user gave the estimator; the message names the field and the fix."""


class TraceError(Exception):
    """The architecture could not be traced (the caller falls back to a formula and says so)."""
