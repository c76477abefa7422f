"""Failure classification: result.json first, then signal, exit code and log patterns."""

from __future__ import annotations

import json
import signal

from runner import exitcodes
from runner.jobs.failures import classify, tail_lines


def _run_dir(tmp_path, log="", result=None, metrics=None):
    (tmp_path / "log.txt").write_text(log)
    if result is not None:
        (tmp_path / "result.json").write_text(json.dumps(result))
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    return tmp_path


def test_completed(tmp_path):
    out = classify(_run_dir(tmp_path, result={"status": "completed"}), 0)
    assert out.status == "completed" and out.reason is None


def test_result_json_wins(tmp_path):
    d = _run_dir(tmp_path, "boom\n", {"status": "failed", "kind": "dataset", "reason": "row 3: no 'messages'",
                                      "fix": "add the column"})
    out = classify(d, exitcodes.DATASET, run_id="r1")
    assert (out.status, out.kind, out.reason, out.fix) == ("failed", "dataset", "row 3: no 'messages'",
                                                           "add the column")
    assert out.log_tail == "boom"


def test_sigkill_names_the_signal_and_ram(tmp_path):
    out = classify(_run_dir(tmp_path, "step 3\n"), -signal.SIGKILL, run_id="r1")
    assert out.status == "failed" and out.kind == "killed" and out.signal == 9
    assert out.reason.startswith("killed by signal 9 (SIGKILL): the host may have run out of RAM")
    assert "ftadvisor runs resume r1" in out.fix


def test_other_signal(tmp_path):
    out = classify(_run_dir(tmp_path), -signal.SIGHUP)
    assert out.kind == "killed" and "signal 1 (SIGHUP)" in out.reason


def test_oom_phase_from_log_and_metrics(tmp_path):
    log = "Traceback...\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB\n"
    assert classify(_run_dir(tmp_path, log), 1).kind == "oom_load"  # no training step logged yet
    d = _run_dir(tmp_path, log, metrics=[{"type": "train", "step": 1}])
    assert classify(d, 1).kind == "oom_step"
    d = _run_dir(tmp_path, "  File trainer.py, in evaluation_loop\n" + log, metrics=[{"type": "train", "step": 1}])
    out = classify(d, exitcodes.OUT_OF_MEMORY)
    assert out.kind == "oom_eval" and "evaluation" in out.reason and "micro_batch_size" in out.fix


def test_cpu_oom_and_missing_module(tmp_path):
    log = "RuntimeError: [enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory\n"
    assert classify(_run_dir(tmp_path, log), 1).kind.startswith("oom_")
    out = classify(_run_dir(tmp_path, "ModuleNotFoundError: No module named 'bitsandbytes'\n"), 1)
    assert out.kind == "missing_dependency" and "pip install bitsandbytes" in out.fix


def test_exit_code_without_result(tmp_path):
    out = classify(_run_dir(tmp_path, "nothing useful\n"), exitcodes.RESUME_REFUSED)
    assert out.kind == "resume_refused"
    out = classify(_run_dir(tmp_path, "ValueError: weird thing\n"), 1)
    assert out.kind == "error" and "ValueError: weird thing" in out.reason


def test_torchrun_rank_signal(tmp_path):
    log = ("torch.distributed.elastic.multiprocessing.api: failed (exitcode: -9) local_rank: 0\n"
           "  exitcode  : -9 (pid: 1234)\n")
    out = classify(_run_dir(tmp_path, log), 1)
    assert out.kind == "killed" and out.signal == 9


def test_requests(tmp_path):
    assert classify(_run_dir(tmp_path), -signal.SIGTERM, requested="cancel").status == "cancelled"
    assert classify(_run_dir(tmp_path), exitcodes.STOPPED, requested="stop").status == "stopped"


def test_stale_result_from_an_earlier_attempt_is_ignored(tmp_path):
    import time

    d = _run_dir(tmp_path, result={"status": "completed"})
    out = classify(d, -9, started_at=time.time() + 60)
    assert out.kind == "killed"


def test_tail_lines(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("\n".join(str(i) for i in range(100)))
    assert tail_lines(p, 3) == "97\n98\n99"
    assert tail_lines(tmp_path / "none", 3) == ""


def test_lost_process_with_a_completed_result_is_completed(tmp_path):
    assert classify(_run_dir(tmp_path, result={"status": "completed"}), None).status == "completed"
    empty = tmp_path / "empty"
    empty.mkdir()
    lost = classify(_run_dir(empty), None)
    assert lost.status == "failed" and lost.kind == "lost"
