"""The job manager the pages share, plus small readers for the run folder's JSON files (formatting only)."""

from __future__ import annotations

import json
from pathlib import Path

import streamlit as st

from ftcore.paths import runs_dir

# Status badges for Markdown headings (Streamlit's coloured badges + Material icons; no emoji font needed).
STATUS_BADGES = {"queued": ("gray", "schedule"), "running": ("blue", "autorenew"), "completed": ("green", "check"),
                 "failed": ("red", "error"), "cancelled": ("orange", "cancel"), "stopped": ("violet", "pause")}
LIVE_REFRESH_S = 2.0  # how often live views poll the run folder; the worker's heartbeat is every 5 s


@st.cache_resource(show_spinner=False)
def _manager(folder: str):
    from runner.jobs import JobManager

    return JobManager(runs_dir=folder)


def manager():
    """One JobManager per runs folder (it keeps no state in memory beyond the folder; safe to share)."""
    return _manager(str(runs_dir()))


def read_json(path: Path) -> dict | None:
    """A run folder's JSON file (report.json, result.json), or None while it is not written yet."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # being rewritten by the worker right now: the next refresh reads it


def status_badge(status: str) -> str:
    """Markdown for a coloured status badge, e.g. ':green-badge[:material/check: completed]'."""
    colour, icon = STATUS_BADGES.get(status, ("gray", "help"))
    return f":{colour}-badge[:material/{icon}: {status}]"
