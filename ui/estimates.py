"""Cached calls into the estimator for the pages (Streamlit caching lives here, the figures in `estimator`).

Each cache is keyed by the request's JSON (a hashable, canonical string), so the same knobs return at once.
Errors are not cached: Streamlit re-raises them and the next call tries again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import streamlit as st

from ui.warmup import loading, ready, wait_with_words

if TYPE_CHECKING:
    from estimator.request import EstimateRequest
    from estimator.result import Estimate

# ``estimator`` (its package imports every result model) is imported at the first estimate, not by the Advisor's
# first question, which only lists the catalog.

METHODS = ("full", "lora", "qlora")
METHOD_LABELS = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
CACHE_ENTRIES = 2048  # estimates are a few KiB each; this keeps a long session's knob history


def api(name: str):
    """A public estimator function by name (``estimate``, ``min_gpus``...), once the warm-up has loaded it."""
    ready()
    import estimator

    return getattr(estimator, name)


@st.cache_data(show_spinner=False)
def model_names() -> dict[str, str]:
    """Catalog id -> display name, sorted by id, for the pickers.

    Read from the catalog's index file itself (``data_path("models", "catalog.yaml")``, which
    ``estimator.catalog`` reads too) so the first page loads neither the estimator nor the model configs. The
    model is resolved and validated by the estimator when an estimate is asked for.
    """
    import yaml

    from ftcore.paths import data_path

    with open(data_path("models", "catalog.yaml"), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    return {model_id: facts["display_name"] for model_id, facts in sorted(raw.items())}


def _request(req_json: str) -> EstimateRequest:
    from estimator.request import EstimateRequest

    return EstimateRequest.model_validate_json(req_json)


@st.cache_data(show_spinner=False)
def gpus():
    """Catalog GPUs (GPU list)."""
    from estimator.catalog import list_gpus

    return list_gpus()


def _stored(req: EstimateRequest) -> tuple[str | None, Estimate | None]:
    """``(key, Estimate)`` from the on-disk result cache (``estimator.result_cache``, which the terminal's
    ``ftadvisor estimate`` fills too): a hit needs neither torch nor transformers; ``(key, None)`` on a miss."""
    from estimator import result_cache
    from estimator.result import Estimate

    key, data = result_cache.lookup(req)
    return key, (Estimate.model_validate(data) if data is not None else None)


@st.cache_data(show_spinner=False, max_entries=CACHE_ENTRIES)
def _estimate(req_json: str):
    req = _request(req_json)
    key, est = _stored(req)
    if est is None:
        est = api("estimate")(req)
        from estimator import result_cache

        result_cache.store(key, est.to_json())
    return est


def estimate(req: EstimateRequest):
    """The estimator's Estimate for ``req``: from this session's memory, else from the on-disk result cache, else
    computed (and stored in both). A spinner says so while the libraries load, unless the disk has the answer."""
    if loading() and _stored(req)[1] is None:
        wait_with_words()
    return _estimate(req.model_dump_json())


def for_method(req: EstimateRequest, method: str):
    """The same request with another method (full / lora / qlora); pure 16-bit is full fine-tuning's only."""
    update = {"method": method} if method == "full" else {"method": method, "master_dtype": "fp32"}
    return req.model_copy(update=update)


@st.cache_data(show_spinner=False, max_entries=256)
def _fitting(req_json: str):
    return api("fitting_gpus")(_request(req_json))


def fitting(req: EstimateRequest):
    """[(gpu_id, Estimate)] for every catalog GPU with the request's other knobs."""
    wait_with_words()
    return _fitting(req.model_dump_json())


@st.cache_data(show_spinner=False, max_entries=256)
def _min_gpus(req_json: str):
    return api("min_gpus")(_request(req_json))


def smallest_gpu_count(req: EstimateRequest):
    """Smallest GPU count that fits (None when no count does)."""
    wait_with_words()
    return _min_gpus(req.model_dump_json())


@st.cache_data(show_spinner=False, max_entries=256)
def _limits(req_json: str) -> tuple[int, int]:
    req = _request(req_json)
    return api("max_batch_size")(req), api("max_seq_len")(req)


def limits(req: EstimateRequest) -> tuple[int, int]:
    """(largest micro-batch, largest sequence length) that fit the request's GPU."""
    wait_with_words()
    return _limits(req.model_dump_json())

