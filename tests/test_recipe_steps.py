"""Steps, epochs, tokens and peak memory of a real tiny run come from the dataset the Trainer iterates.

Issue 9 measured ``--epochs 1 --packing`` on 108 rows training 4.5-6.75 epochs (steps from the file's row count,
then the Trainer looping over the few packed rows). Here the Trainer's own ``state.epoch`` is the referee.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runner/train/worker.py

import json

import pytest

from runner.spec import DatasetSpec, RunSpec

ROWS = 60  # 54 train + 6 eval (eval_fraction 0.1)
BATCH = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("steps") / "add.jsonl"
    rows = [{"prompt": f"What is {i} plus {i + 1}? ", "completion": str(2 * i + 1)} for i in range(ROWS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run(model_dir, dataset, run_dir, packing: bool):
    from runner.train import recipe

    spec = RunSpec(model=str(model_dir), dataset=DatasetSpec(path=str(dataset), eval_fraction=0.1, packing=packing),
                   epochs=1, micro_batch_size=BATCH, seq_len=64, save_steps=1000, precision="fp32",
                   learning_rate=1e-3, logging_steps=1)
    return recipe.run(spec, run_dir)


@pytest.mark.parametrize("packing", [False, True])
def test_one_epoch_is_one_epoch(tiny_model_dir, dataset, tmp_path, packing):
    r = _run(tiny_model_dir, dataset, tmp_path / "run", packing)
    state, ds = r.trainer.state, r.trainer.train_dataset
    assert len(r.train_rows) == 54
    if packing:
        assert len(ds) < 54 / 3  # rows of ~12 tokens fold several to a 64-token row
    # the Trainer's own accounting: one pass over its dataset, every batch once
    assert state.epoch == pytest.approx(1.0)
    assert state.global_step == state.max_steps == -(-len(ds) // BATCH)
    train_logs = [h for h in state.log_history if "loss" in h]
    assert train_logs[-1]["epoch"] == pytest.approx(1.0)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert rep["epochs"] == pytest.approx(1.0) and rep["steps"] == state.global_step
    # one epoch trains each token once: the tokens are the dataset's non-padding tokens (the tiny tokenizer's
    # pad id is its own <pad>, never inside a row), counted by the Trainer (include_num_input_tokens_seen)
    assert rep["train_tokens"] == sum(len(x) for x in ds["input_ids"])
    assert rep["train_tokens"] == state.num_input_tokens_seen


def test_gradient_accumulation_keeps_the_last_partial_update(tiny_model_dir, dataset, tmp_path):
    """54 rows / batch 4 = 14 batches; with 4 accumulation steps the Trainer makes ceil(14 / 4) = 4 updates per
    epoch (the last one from 2 batches). The old floor gave 3 steps and stopped at epoch 0.75."""
    from runner.train import recipe

    spec = RunSpec(model=str(tiny_model_dir), dataset=DatasetSpec(path=str(dataset), eval_fraction=0.1), epochs=1,
                   micro_batch_size=BATCH, gradient_accumulation_steps=4, seq_len=64, save_steps=1000,
                   precision="fp32", learning_rate=1e-3)
    state = recipe.run(spec, tmp_path / "run").trainer.state
    assert state.global_step == 4 and state.epoch == pytest.approx(1.0)


def test_report_peak_memory_is_a_named_peak(tiny_model_dir, dataset, tmp_path):
    _run(tiny_model_dir, dataset, tmp_path / "run", packing=False)
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    assert "peak_memory_bytes" not in rep
    peak = rep["peak_memory"]
    assert peak["kind"] == "cpu_max_rss"  # no CUDA in this test
    # the peak is at least what the process holds now (resident pages from /proc, an independent reading)
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert peak["bytes"] >= resident * 0.98  # statm is read after the report, so allow for pages freed since
    from runner.jobs.runfiles import read_report

    assert read_report(tmp_path / "run").peak_memory.bytes == peak["bytes"]  # the typed contract reads it back
