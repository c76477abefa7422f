"""Shared test setup: no network, a private FTADVISOR_HOME per session, and tiny real models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads spin-wait by default; on a busy 2-core box that made small CPU steps ~50x slower (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _private_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("ftadvisor-home")
    old = os.environ.get("FTADVISOR_HOME")
    os.environ["FTADVISOR_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("FTADVISOR_HOME", None)
    else:
        os.environ["FTADVISOR_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-architecture model folder (2 layers, hidden 64, locally trained BPE tokenizer)."""
    from runner.train.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A tiny Qwen2-architecture model folder with tied embeddings."""
    from runner.train.tinymodel import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture
def make_report():
    """A ``runner.jobs.runfiles.Report`` with plausible required fields, for tests of what reads one; keyword
    arguments set or override fields (validated: an unknown one is an error)."""
    from runner.jobs.runfiles import DatasetSummary, Report

    def make(**fields) -> Report:
        base = dict(model="tiny", model_dir="/tmp/tiny", method="lora", rank=8, device="cpu", precision="fp32",
                    precision_requested="auto", dataset=DatasetSummary(rows=10), train_rows=10, eval_rows=2,
                    steps=4, max_steps=4, train_seconds=1.5, trainable_params=1000, total_params=100_000,
                    adapter_bytes=4000, output="/tmp/run/adapter")
        return Report.model_validate(base | fields)

    return make
