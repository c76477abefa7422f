"""The sidebar every page shares: what the tool is, where it writes, and how to reach the same from the CLI."""

from __future__ import annotations

import streamlit as st

from ftcore.paths import home


def draw_sidebar() -> None:
    with st.sidebar:
        st.caption("Full fine-tuning, LoRA or QLoRA? Will it fit, how long, what cost? Then launch it.")
        st.caption(f"Data folder: `{home()}`")
        st.caption("Same from a terminal: `ftadvisor --help`")
