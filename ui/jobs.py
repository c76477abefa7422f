"""The job manager the pages share (the run folder's files are read through ``runner.jobs.runfiles``)."""

from __future__ import annotations

import streamlit as st

from ftcore.paths import runs_dir

# Status badges for Markdown headings (Streamlit's coloured badges + Material icons; no emoji font needed).
STATUS_BADGES = {"queued": ("gray", "schedule"), "running": ("blue", "autorenew"), "completed": ("green", "check"),
                 "failed": ("red", "error"), "cancelled": ("orange", "cancel"), "stopped": ("violet", "pause")}
LIVE_REFRESH_S = 2.0  # how often live views poll the run folder; the worker's heartbeat is every 5 s


@st.cache_resource(show_spinner=False)
def _manager(folder: str):
    from runner.jobs.manager import JobManager

    return JobManager(runs_dir=folder)


def manager():
    """One JobManager per runs folder (it keeps no state in memory beyond the folder; safe to share)."""
    return _manager(str(runs_dir()))


def status_badge(status: str) -> str:
    """Markdown for a coloured status badge, e.g. ':green-badge[:material/check: completed]'."""
    colour, icon = STATUS_BADGES.get(status, ("gray", "help"))
    return f":{colour}-badge[:material/{icon}: {status}]"
