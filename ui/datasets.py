"""Dataset helpers for the Launch page: shipped sample files, and a cached dataset check (runner.train.data)."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ftcore.paths import data_path
from ui.warmup import ready

SHIPPED_DIR = data_path("datasets")
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def shipped() -> list[Path]:
    """Dataset files shipped in data/datasets/ (sorted)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p for p in SHIPPED_DIR.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


@st.cache_resource(show_spinner=False, max_entries=4)
def tokenizer(model_ref: str, trust_remote_code: bool = False):
    """The run's tokenizer (resolving the model folder the same way the worker will). Raises RunnerError."""
    ready()  # before load_tokenizer, which imports transformers
    from runner.models import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(model_ref), trust_remote_code=trust_remote_code)


@st.cache_data(show_spinner=False, max_entries=32)
def check(ds_json: str, model_ref: str, seq_len: int, mtime_ns: int, trust_remote_code: bool = False):
    """runner.train.data.check_dataset for a dataset spec (JSON) and model; keyed also by the file's mtime."""
    ready()
    from runner.spec import DatasetSpec  # not at the top: the Advisor's first question imports this module
    from runner.train.data import check_dataset

    ds = DatasetSpec.model_validate_json(ds_json)
    return check_dataset(ds, tokenizer(model_ref, trust_remote_code), seq_len)


def mtime_ns(path: str) -> int:
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return 0
