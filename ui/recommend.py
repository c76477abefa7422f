"""The advisor's recommendation, cached per set of answers (the rules and the estimator do the work)."""

from __future__ import annotations

import json

import streamlit as st
from pydantic import ValidationError

from ftcore.errors import UserError
from ui.errors import message_of
from ui.warmup import ready


@st.cache_data(show_spinner=False, max_entries=128)
def _recommend(answers_json: str):
    from advisor.recommend import recommend
    from advisor.result import NothingFits

    ready()
    try:
        return recommend(json.loads(answers_json)), None, None
    except NothingFits as exc:
        return None, {"message": str(exc), **exc.result.model_dump(mode="json")}, None
    except (UserError, ValidationError) as exc:
        return None, None, message_of(exc)


def recommend_cached(answers: dict):
    """(Recommendation, None, None) | (None, NoFit as dict with 'message', None) | (None, None, error message)."""
    return _recommend(json.dumps(answers, sort_keys=True, default=str))
