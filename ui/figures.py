"""The pages' plotly figures, built once per set of inputs (``ui.charts`` builds them; this module keeps them).

Building a figure validates every property through plotly's validators: 10-30 ms for the memory bars on an idle
core, over 100 ms on a busy one, paid again on every rerun although the estimate behind it came from the cache.
A figure is kept per chart and inputs (their JSON) and shared read-only: ``st.plotly_chart`` serialises a copy
(``plotly.tools.return_figure_from_figure_or_data`` calls ``to_dict``) and never changes the figure, and no page
changes one after it is built. ``st.cache_resource`` because ``st.cache_data`` would pickle it, and unpickling a
figure runs the validators again (measured: 0.27 s for the memory bars).
"""

from __future__ import annotations

import json

import streamlit as st

from ui import charts

FIGURES_KEPT = 256  # a figure is a few KiB; this covers a long session's knob history


@st.cache_resource(show_spinner=False, max_entries=FIGURES_KEPT)
def _figure(chart: str, args_json: str):
    return getattr(charts, chart)(**json.loads(args_json))


def figure(chart: str, **kwargs):
    """``ui.charts.<chart>(**kwargs)`` (plain numbers and strings), the same object for the same arguments."""
    return _figure(chart, json.dumps(kwargs))  # insertion order kept: it is the order of the bars and lines
