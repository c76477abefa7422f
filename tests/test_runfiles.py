"""The run-folder contract (runner/jobs/runfiles.py): what the worker writes is what the readers read, by type."""

from __future__ import annotations

import json
import time

import pytest

from runner.jobs import runfiles
from runner.errors import RunnerError
from runner.jobs.failures import classify
from runner.jobs.runfiles import (EvalRow, Heartbeat, Result, TrainRow, append_metrics, read_heartbeat, read_metrics,
                             read_result, write_model)


def test_result_round_trip_and_classify_reads_it(tmp_path):
    from runner.train.worker import write_result

    write_result(tmp_path, "failed", 5, "oom_step", "out of memory at a training step", "lower micro_batch_size",
                 field="micro_batch_size")
    res = read_result(tmp_path)
    assert isinstance(res, Result) and res.status == "failed" and res.exit_code == 5
    assert res.field == "micro_batch_size" and res.time == pytest.approx(time.time(), abs=60)
    out = classify(tmp_path, 5)
    assert (out.status, out.kind, out.fix) == ("failed", "oom_step", "lower micro_batch_size")
    assert read_result(tmp_path, newer_than=time.time() + 3600) is None  # an earlier attempt's file
    assert read_result(tmp_path / "missing") is None


def test_a_file_off_the_contract_is_an_error_naming_the_file(tmp_path):
    (tmp_path / runfiles.RESULT_FILE).write_text(json.dumps({"status": "completed", "exit_code": 0,
                                                              "exitcode": 0}))
    with pytest.raises(RunnerError, match="result.json") as err:
        read_result(tmp_path)
    assert "exitcode" in str(err.value)
    # the classifier does not crash on it: the exit code decides, and the log tail says why
    out = classify(tmp_path, 0)
    assert out.status == "completed" and "result.json does not match" in out.log_tail


def test_heartbeat_thread_writes_what_the_supervisor_reads(tmp_path):
    from runner.train.callbacks import Heartbeat as HeartbeatThread, Progress

    progress = Progress()
    progress.update(step=3, max_steps=10, phase="train")
    HeartbeatThread(tmp_path / runfiles.HEARTBEAT_FILE, progress).beat()
    beat = read_heartbeat(tmp_path)
    assert beat == Heartbeat(pid=beat.pid, step=3, max_steps=10, phase="train", time=beat.time)
    assert read_heartbeat(tmp_path / "missing") is None


def test_metrics_rows_are_typed_and_a_half_written_line_is_skipped(tmp_path):
    path = tmp_path / runfiles.METRICS_FILE
    append_metrics(path, TrainRow(step=1, max_steps=4, loss=2.5, tokens_per_s=100.0))
    append_metrics(path, EvalRow(step=1, eval_loss=2.0))
    with open(path, "a") as fh:
        fh.write('{"type": "train", "step": 2, "max_ste')  # the worker is writing this line right now
    rows = read_metrics(path)
    assert rows == [TrainRow(step=1, max_steps=4, loss=2.5, tokens_per_s=100.0), EvalRow(step=1, eval_loss=2.0)]
    assert runfiles.train_rows(rows) == rows[:1] and runfiles.eval_rows(rows) == rows[1:]
    assert read_metrics(tmp_path / "missing.jsonl") == []
    path.write_text('{"type": "train", "step": 1, "max_steps": 4, "los": 2.5}\n')
    with pytest.raises(RunnerError, match="metrics.jsonl"):
        read_metrics(path)


def test_write_is_atomic_and_leaves_no_temp_file(tmp_path):
    write_model(tmp_path / runfiles.HEARTBEAT_FILE, Heartbeat(pid=1, step=0, max_steps=0, time=1.0))
    assert [p.name for p in tmp_path.iterdir()] == [runfiles.HEARTBEAT_FILE]
