"""Import the heavy libraries (torch, transformers, peft) in the background once the first page is on screen.

The app starts fast because pages import them lazily; the first estimate would then pay several seconds of
imports. A daemon thread started after the first render (and a short delay for the browser to draw it) takes that
cost while the user reads the page, and ends with one tiny estimate, so that the code paths of a first trace
(transformers' Llama modules, fake-tensor kernels) are loaded too; that estimate is skipped when a page already
waits (its own estimate loads the same paths). Every page call that needs those libraries goes through ``ready()``
first, so two threads never import transformers at the same time (its lazy module is not safe for that);
``wait_with_words()`` does the same with a spinner that says what the page waits for. ``FTADVISOR_WARMUP=0`` turns
the warm-up off.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time

import streamlit as st

# What the estimator's first estimate imports (measured: about 5 s of CPU, 7-12 s on a busy 2-core machine).
HEAVY_MODULES = ("torch", "transformers", "peft", "accelerate")
# What later pages draw with (tables), loaded after the estimator's libraries.
LATER_MODULES = ("pandas",)
# A Llama-architecture catalog model and a short sequence: loads the modules every first trace needs in ~0.5 s.
WARM_REQUEST = dict(model="smollm2-135m", method="qlora", seq_len=16)
LOADING_WORDS = ("Loading PyTorch, transformers and peft for the estimator (once per server start, a few "
                 "seconds)...")

#: Seconds the warm-up waits after the first page's script ended before ~5 s of CPU-bound imports take a core, so
#: that the browser draws that page first (measured on 2 cores: starting at once delayed the first question by
#: about 0.5 s). A page that needs the libraries sooner (``ready()``) starts it at once.
WARMUP_DELAY_S = 1.0

log = logging.getLogger("ftadvisor.warmup")
_started = threading.Event()
_needed = threading.Event()
_done = threading.Event()
_start_lock = threading.Lock()


def _import_all() -> None:
    _needed.wait(WARMUP_DELAY_S)
    start = time.perf_counter()
    try:
        for name in HEAVY_MODULES:
            importlib.import_module(name)
        import estimator
        from estimator.request import EstimateRequest

        if not _needed.is_set():  # a page waiting for its own estimate warms the same paths; do not delay it
            try:
                estimator.estimate(EstimateRequest(**WARM_REQUEST))
            except Exception as exc:  # noqa: BLE001 - a warm-up estimate is an optimisation; pages report errors
                log.warning("ftadvisor warm-up: the warm-up estimate failed (%s)", exc)
    finally:
        _done.set()
        # benchmarks/bench_startup.py waits for this line
        print(f"ftadvisor warm-up: done in {time.perf_counter() - start:.1f} s", flush=True)
    for name in LATER_MODULES:  # after ready(): a page that needs one meanwhile imports it itself (import lock)
        importlib.import_module(name)  # dependencies of the package (pyproject): a failure is a broken install


def _start_thread() -> None:
    with _start_lock:
        if _started.is_set():
            return
        _started.set()
        threading.Thread(target=_import_all, name="ftadvisor-warm-up", daemon=True).start()


def enabled() -> bool:
    return os.environ.get("FTADVISOR_WARMUP", "1") != "0"


def warm_up() -> None:
    """Start the background import once per server process (unless FTADVISOR_WARMUP=0)."""
    if enabled():
        _start_thread()


def loading() -> bool:
    """True while the heavy libraries are not loaded yet (always False with the warm-up off)."""
    return enabled() and not _done.is_set()


def ready() -> None:
    """Wait until torch/transformers/peft are imported (starting the import if no page did yet); call before
    torch/transformers work. With the warm-up off, returns at once and the caller imports them itself."""
    if enabled():
        _needed.set()
        _start_thread()
        _done.wait()


def wait_with_words() -> None:
    """``ready()`` under a spinner that says what is loading, when it is still loading (never a blank wait)."""
    if loading():
        with st.spinner(LOADING_WORDS, show_time=True):
            ready()
