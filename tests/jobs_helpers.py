"""What the job and process tests share: waiting for a condition, a free local port, a job manager that leaves no
process behind, the metrics rows of a run, a small arithmetic dataset, and the stop-and-save -> resume round trip of
a real run."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

from runner.jobs.manager import JobManager
from runner.jobs.runfiles import TrainRow, read_metrics
from runner.jobs.supervisor import run_processes
from runner.spec import RunSpec


def wait_for(cond: Callable[[], object], timeout_s: float = 20.0, poll_s: float = 0.05) -> bool:
    """Poll ``cond`` until it is true or ``timeout_s`` seconds have passed; its last answer, as a bool."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(poll_s)
    return bool(cond())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing holds now (the OS picks it), for a server or a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def job_manager(runs_dir: Path) -> Iterator[JobManager]:
    """A JobManager on ``runs_dir`` that cancels every unfinished run at the end, even when the test failed."""
    mgr = JobManager(runs_dir)
    try:
        yield mgr
    finally:
        for rec in mgr.list():
            if not rec.finished:
                mgr.cancel(rec.id, grace_s=1)


def train_steps(run_dir: Path) -> list[TrainRow]:
    """The training rows of a run's metrics.jsonl (eval rows left out)."""
    return [m for m in read_metrics(Path(run_dir) / "metrics.jsonl") if isinstance(m, TrainRow)]


def sum_rows(n: int) -> list[dict]:
    """``n`` prompt/completion rows "Qi: what is i plus i?" -> " 2i"."""
    return [{"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def stop_save_then_resume(manager: JobManager, spec: RunSpec, *, while_running: Callable | None = None,
                          when_stopped: Callable | None = None) -> tuple[Path, int]:
    """Launch ``spec``, stop-and-save once two steps are logged, check the stop, resume, check it completes.

    ``while_running(rec, run_dir)`` runs before the stop, ``when_stopped(run_dir, stop_step)`` before the resume.
    Returns the run folder and the step of the checkpoint it stopped at; the caller checks the run's own figures.
    """
    rec = manager.launch(spec)
    run_dir = Path(rec.output_dir)
    assert wait_for(lambda: len(train_steps(run_dir)) >= 2, timeout_s=300, poll_s=0.2), manager.log_tail(rec.id, 80)
    if while_running:
        while_running(rec, run_dir)
    manager.stop_and_save(rec.id)
    stopped = manager.wait(rec.id, timeout_s=200)
    assert stopped.status == "stopped", (stopped.reason, manager.log_tail(rec.id, 80))
    checkpoints = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    assert checkpoints, "stop-and-save left no checkpoint"
    stop_step = checkpoints[-1]
    assert 2 <= stop_step < spec.max_steps
    assert not run_processes(rec.id).get(rec.id)
    if when_stopped:
        when_stopped(run_dir, stop_step)

    resumed = manager.resume(rec.id)
    done = manager.wait(resumed.id, timeout_s=400)
    assert done.status == "completed", (done.reason, manager.log_tail(rec.id, 80))
    steps = [m.step for m in train_steps(run_dir)]
    assert steps[-1] == spec.max_steps and stop_step + 1 in steps  # continued after the checkpoint, not from step 1
    return run_dir, stop_step
