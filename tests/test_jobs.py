"""Job manager with a stand-in worker (tests/jobs_fake_worker.py): queue, cancel, stop, resume, failures,
restart. Fast (no torch in the worker); the real worker on the tiny model is in test_jobs_real.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs_helpers import job_manager, wait_for
from runner.jobs.runfiles import TrainRow, read_metrics
from runner.spec import RunSpec
from runner.jobs.supervisor import run_processes

FAKE_WORKER = Path(__file__).with_name("jobs_fake_worker.py")


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("FTADVISOR_WORKER_CMD", f"{sys.executable} {FAKE_WORKER}")
    monkeypatch.setenv("FTADVISOR_CANCEL_GRACE_S", "3")
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    with job_manager(tmp_path / "runs") as mgr:
        yield mgr


@pytest.fixture
def spec(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    return RunSpec(model="tiny-model", method="lora", dataset={"path": str(data)}, name="t")


def test_launch_returns_at_once_and_completes(manager, spec):
    t0 = time.monotonic()
    rec = manager.launch(spec)
    assert time.monotonic() - t0 < 2.0  # launch does not wait for the run
    assert rec.status in ("queued", "running")
    assert (rec.run_dir / "spec.json").exists() and RunSpec.load(rec.run_dir / "spec.json").model == "tiny-model"
    done = manager.wait(rec.id, timeout_s=30)
    assert done.status == "completed", (done.reason, manager.log_tail(rec.id))
    assert done.exit_code == 0 and done.started_at and done.ended_at and done.ended_at >= done.started_at
    steps = [m.step for m in manager.metrics(rec.id) if m.type == "train"]
    assert steps == list(range(1, 21))
    assert "fake worker pid" in manager.log_tail(rec.id)  # worker output goes to log.txt
    assert not run_processes(rec.id)
    assert manager.registry.integrity_ok()


def test_metrics_tolerates_partial_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1, "max_steps": 2}\n{"type": "train", "st')
    assert read_metrics(path) == [TrainRow(step=1, max_steps=2)]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_second_launch_queues_until_first_finishes(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "30")
    first = manager.launch(spec)
    second = manager.launch(spec.model_copy(update={"name": "second"}))
    assert wait_for(lambda: manager.get(first.id).status == "running")
    assert manager.get(second.id).status == "queued"
    a = manager.wait(first.id, timeout_s=30)
    b = manager.wait(second.id, timeout_s=30)
    assert a.status == b.status == "completed"
    assert b.started_at >= a.ended_at  # one job on the device at a time, in order


def test_queue_is_fifo(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "5")
    recs = [manager.launch(spec.model_copy(update={"name": f"r{i}"})) for i in range(3)]
    done = [manager.wait(r.id, timeout_s=40) for r in recs]
    assert [d.status for d in done] == ["completed"] * 3
    starts = [d.started_at for d in done]
    assert starts == sorted(starts)


def test_cancel_leaves_no_process_behind(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "child")  # the worker starts a grandchild in its own session, like torchrun
    monkeypatch.setenv("FAKE_STEPS", "10000")
    rec = manager.launch(spec)
    assert wait_for(lambda: len(run_processes(rec.id).get(rec.id, [])) >= 3)  # supervisor, worker, grandchild
    out = manager.cancel(rec.id)
    assert out.status == "cancelled"
    assert not run_processes(rec.id), "a process of the cancelled run survived"
    assert manager.registry.integrity_ok()


def test_cancel_while_queued(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "10000")
    first = manager.launch(spec)
    second = manager.launch(spec)
    assert wait_for(lambda: manager.get(first.id).status == "running")
    assert manager.cancel(second.id).status == "cancelled"
    assert manager.get(first.id).status == "running"
    assert manager.cancel(first.id).status == "cancelled"
    assert not run_processes(first.id) and not run_processes(second.id)


def test_sigkill_mid_run_is_failed_with_reason_and_resume_finishes(manager, spec):
    rec = manager.launch(spec)
    assert wait_for(lambda: any(m.step >= 7 for m in manager.metrics(rec.id)))
    worker = manager.get(rec.id).worker_pid
    os.kill(worker, signal.SIGKILL)
    failed = manager.wait(rec.id, timeout_s=20)
    assert failed.status == "failed" and failed.kind == "killed"
    assert failed.reason.startswith("killed by signal 9 (SIGKILL)") and "RAM" in failed.reason
    assert failed.exit_code == -9
    assert (rec.run_dir / "checkpoint-5").is_dir()  # checkpoints are kept
    resumed = manager.resume(rec.id)
    assert resumed.status in ("queued", "running") and resumed.resume
    done = manager.wait(rec.id, timeout_s=30)
    assert done.status == "completed" and done.attempts == 2
    assert "resuming from step 5" in (rec.run_dir / "log.txt").read_text()


def test_stop_and_save_then_resume(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "200")
    rec = manager.launch(spec)
    assert wait_for(lambda: any(m.step >= 3 for m in manager.metrics(rec.id)))
    manager.stop_and_save(rec.id)
    stopped = manager.wait(rec.id, timeout_s=20)
    assert stopped.status == "stopped" and stopped.exit_code == 6
    assert list(rec.run_dir.glob("checkpoint-*"))
    monkeypatch.setenv("FAKE_STEPS", "10")
    assert manager.wait(manager.resume(rec.id).id, timeout_s=30).status == "completed"


def test_worker_failure_is_classified_from_result(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "oom")
    rec = manager.wait(manager.launch(spec).id, timeout_s=30)
    assert rec.status == "failed" and rec.kind == "oom_step" and rec.exit_code == 5
    assert rec.fix == "lower micro_batch_size"
    assert "CUDA out of memory" in manager.log_tail(rec.id)


def test_supervisor_killed_too_is_reconciled_as_lost(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "10000")
    rec = manager.launch(spec)
    assert wait_for(lambda: manager.get(rec.id).status == "running" and manager.get(rec.id).worker_pid)
    manager.signal(rec.id, signal.SIGKILL)  # the whole run dies at once (e.g. the machine's OOM killer spree)
    assert wait_for(lambda: not run_processes(rec.id))
    out = manager.get(rec.id)
    assert out.status == "failed" and out.kind == "lost", out.reason


def test_new_manager_in_another_process_sees_the_right_status(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "60")
    rec = manager.launch(spec)
    assert wait_for(lambda: manager.get(rec.id).status == "running")
    code = ("import sys; from runner.jobs.manager import JobManager; m = JobManager(sys.argv[1]); "
            "r = m.get(sys.argv[2]); print(r.status); print(m.wait(r.id, 60).status)")
    out = subprocess.run([sys.executable, "-c", code, str(manager.runs_dir), rec.id], capture_output=True,
                         text=True, timeout=90, cwd=Path(__file__).parents[1])
    assert out.stdout.split() == ["running", "completed"], out.stderr
    assert manager.get(rec.id).status == "completed"


def test_unknown_run_and_resume_of_completed_run_are_user_errors(manager, spec, monkeypatch):
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="run_id"):
        manager.get("nope")
    monkeypatch.setenv("FAKE_STEPS", "2")
    rec = manager.wait(manager.launch(spec).id, timeout_s=30)
    with pytest.raises(RunnerError, match="completed"):
        manager.resume(rec.id)
    assert manager.get(rec.id[:17]).id == rec.id  # an unambiguous prefix works


def test_missing_dataset_is_refused_before_anything_is_written(manager, spec):
    from runner.errors import RunnerError

    bad = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"path": "/nope/x.jsonl"})})
    with pytest.raises(RunnerError, match="dataset.path"):
        manager.launch(bad)
    assert manager.list() == []


def test_silent_worker_is_reported_by_heartbeat_but_left_running(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang")
    monkeypatch.setenv("FTADVISOR_HEARTBEAT_STALE_S", "1.5")
    rec = manager.launch(spec)
    assert wait_for(lambda: (manager.get(rec.id).reason or "").startswith("no heartbeat"), timeout_s=30)
    hung = manager.get(rec.id)
    assert hung.status == "running" and hung.step == 3 and "still running" in hung.reason
    assert manager.cancel(rec.id).status == "cancelled"


def test_supervisor_killed_alone_the_worker_finishes_and_the_row_follows(manager, spec, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "40")
    rec = manager.launch(spec)
    assert wait_for(lambda: manager.get(rec.id).worker_pid)
    os.kill(manager.get(rec.id).pid, signal.SIGKILL)  # only the supervisor dies; the worker goes on
    out = manager.wait(rec.id, timeout_s=30)
    assert out.status == "completed", out.reason  # reconciled from the worker's result.json
