"""Rank sweep: specs per rank, queue order, and the comparison table (stand-in worker; real run is slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runner.errors import RunnerError
from runner.jobs.manager import JobManager
from runner.spec import RunSpec
from runner.jobs.sweep import launch_sweep, parse_ranks, rank_specs, sweep_rows

FAKE_WORKER = Path(__file__).with_name("jobs_fake_worker.py")


@pytest.fixture
def spec(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    return RunSpec(model="tiny-model", method="lora", dataset={"path": str(data)}, name="sw")


def test_parse_ranks():
    assert parse_ranks("4,8, 16") == [4, 8, 16]
    for bad, field_msg in (("4,x", "--ranks"), ("0,4", "between 1 and 1024"), ("4,4", "each rank once"),
                           ("", "at least one")):
        with pytest.raises(RunnerError, match=field_msg):
            parse_ranks(bad)


def test_rank_specs_keep_alpha_ratio_and_everything_else(spec):
    # The seed's experiment uses lora_alpha = 2*r; the default spec (r=16, alpha=32) has the same ratio.
    specs = rank_specs(spec, [4, 8, 64])
    assert [(s.peft.r, s.peft.alpha) for s in specs] == [(4, 8.0), (8, 16.0), (64, 128.0)]
    assert {s.learning_rate for s in specs} == {spec.learning_rate}
    assert [s.name for s in specs] == ["sw r=4", "sw r=8", "sw r=64"]
    out = rank_specs(spec.model_copy(update={"output_dir": "/tmp/sweep"}), [4])[0].output_dir
    assert out == "/tmp/sweep/rank-4"
    with pytest.raises(RunnerError, match="method"):
        rank_specs(spec.model_copy(update={"method": "full"}), [4])


def test_sweep_runs_in_order_and_builds_the_table(tmp_path, spec, monkeypatch):
    monkeypatch.setenv("FTADVISOR_WORKER_CMD", f"{sys.executable} {FAKE_WORKER}")
    monkeypatch.setenv("FAKE_STEPS", "3")
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    manager = JobManager(tmp_path / "runs")
    records = launch_sweep(manager, spec, [8, 4])
    assert len({r.sweep_id for r in records}) == 1 and records[0].sweep_id
    done = [manager.wait(r.id, timeout_s=40) for r in records]
    assert [d.status for d in done] == ["completed", "completed"]
    assert done[1].started_at >= done[0].ended_at  # one after another, in the order given
    rows = sweep_rows(manager, records)
    assert [r.rank for r in rows] == [4, 8]
    # The stand-in worker writes 1000*r bytes of weights and reports 100*r trainable params and loss 2/r.
    assert [r.adapter_bytes for r in rows] == [4000, 8000]  # tokenizer.json beside it is not counted
    assert [r.trainable_params for r in rows] == [400, 800]
    assert [r.final_eval_loss for r in rows] == [0.5, 0.25]
    assert all(r.train_seconds is not None for r in rows)
