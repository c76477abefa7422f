"""Import the heavy libraries (torch, transformers, peft) in the background once the first page is on screen.

The app starts fast because pages import them lazily; the first estimate would then pay several seconds of
imports. A daemon thread started after the first render takes that cost while the user reads the page.
Every page call that needs those libraries goes through ``ready()`` first, so two threads never import
transformers at the same time (its lazy module is not safe for that). ``FTADVISOR_WARMUP=0`` turns it off.
"""

from __future__ import annotations

import importlib
import os
import threading

import streamlit as st

# What the estimator's first estimate imports (measured: about 7-12 s on a busy 2-core machine, most of it torch).
HEAVY_MODULES = ("torch", "transformers", "peft", "accelerate")
_started = threading.Event()
_done = threading.Event()


def _import_all() -> None:
    try:
        for name in HEAVY_MODULES:
            importlib.import_module(name)
        import estimator

        estimator.estimate  # noqa: B018 - through the package's lazy attribute (see ui.estimates.api)
    finally:
        _done.set()


@st.cache_resource(show_spinner=False)
def _start() -> threading.Thread:
    _started.set()
    thread = threading.Thread(target=_import_all, name="ftadvisor-warm-up", daemon=True)
    thread.start()
    return thread


def warm_up() -> None:
    """Start the background import once per server process (unless FTADVISOR_WARMUP=0)."""
    if os.environ.get("FTADVISOR_WARMUP", "1") != "0":
        _start()


def ready() -> None:
    """Wait for the background import, if one was started (call before torch/transformers work)."""
    if _started.is_set():
        _done.wait()
