"""Stop-and-save under ``accelerate launch`` (two CPU ranks through the job manager), as under torchrun.

``accelerate launch --multi_gpu --num_processes 2`` with ``TrainingArguments(use_cpu=True)`` runs two gloo ranks on
CPU (REFERENCE.md "Multi-process on a CPU machine"). Stop-and-save signals only the processes that registered as
training ranks in the run folder (``runner.jobs.supervisor.register_worker``), never the launcher: the old argv match
(``"runner.train.worker" in cmdline and "launch" not in cmdline``) also picked ``python -m accelerate.commands.launch
... -m runner.train.worker RUN_DIR``, SIGUSR1 killed its elastic agent, and the run ended "cancelled" instead of
"stopped" (measured before this change on this machine).

Slow: two real accelerate launches (about 2.5 minutes in all on the shared 2-core machine).
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from jobs_helpers import free_port, job_manager, stop_save_then_resume, sum_rows, wait_for, write_jsonl
from runner.jobs.supervisor import run_processes, worker_processes
from runner.spec import DatasetSpec, DistributionSpec, RunSpec

ROWS, MICRO_BATCH, NPROC, MAX_STEPS = 24, 2, 2, 30


@pytest.fixture
def manager(tmp_path, monkeypatch):
    monkeypatch.setenv("FTADVISOR_CANCEL_GRACE_S", "5")
    monkeypatch.delenv("FTADVISOR_WORKER_CMD", raising=False)
    with job_manager(tmp_path / "runs") as mgr:
        yield mgr


@pytest.mark.slow
def test_accelerate_two_ranks_stop_save_then_resume(manager, tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", sum_rows(ROWS))
    spec = RunSpec(name="accelerate-two-ranks", model=str(tiny_model_dir), method="lora",
                   dataset=DatasetSpec(path=str(data), eval_fraction=0.2), max_steps=MAX_STEPS, save_steps=100,
                   micro_batch_size=MICRO_BATCH, seq_len=32, precision="fp32", device="cpu", learning_rate=1e-2,
                   distribution=DistributionSpec(nproc_per_node=NPROC, strategy="ddp", launcher="accelerate",
                                                 master_port=free_port()))  # accelerate's static rendezvous

    def only_the_ranks_are_workers(rec, run_dir):
        # the ranks registered themselves; the launcher (which also has "runner.train.worker" in its argv) did not
        workers = worker_processes(rec.id, run_dir)
        assert len(workers) == NPROC
        launchers = [p for p in run_processes(rec.id).get(rec.id, [])
                     if "accelerate.commands.launch" in psutil.Process(p).cmdline()]
        assert len(launchers) == 1 and launchers[0] not in workers

    def both_ranks_saved(run_dir, stop_step):
        # both ranks took part in the checkpoint (the Trainer saves one RNG state per rank)
        assert {p.name for p in (run_dir / f"checkpoint-{stop_step}").glob("rng_state_*.pth")} == {
            "rng_state_0.pth", "rng_state_1.pth"}

    run_dir, stop_step = stop_save_then_resume(manager, spec, while_running=only_the_ranks_are_workers,
                                               when_stopped=both_ranks_saved)

    # tokens are summed over both ranks (the Trainer's include_num_input_tokens_seen): this session ran
    # (MAX_STEPS - stop_step) steps of MICRO_BATCH rows on each of NPROC ranks; each row is between the
    # shortest and the longest row of the file (lengths from the tokenizer itself), and one rank alone could
    # not reach the lower bound (shortest x 2 > longest here)
    from runner.models import load_tokenizer
    from runner.train import data as rdata

    tok = load_tokenizer(tiny_model_dir)
    lengths = [len(rdata.encode(r, "prompt_completion", tok).input_ids) for r in sum_rows(ROWS)]
    rows_seen = (MAX_STEPS - stop_step) * MICRO_BATCH * NPROC
    assert 2 * min(lengths) > max(lengths)
    report = json.loads((run_dir / "report.json").read_text())
    assert rows_seen * min(lengths) <= report["train_tokens"] <= rows_seen * max(lengths)


def test_only_registered_ranks_are_workers(tmp_path):
    """A process whose argv names runner.train.worker (as a launcher's does) is not a worker until it registers; a
    registration whose pid now belongs to another process (start time differs) is ignored."""
    import os
    import subprocess
    import sys

    from runner.jobs.runfiles import WorkerEntry, write_model
    from runner.jobs.supervisor import RUN_ENV, worker_pid_path

    run_id = f"reg-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, **{RUN_ENV: run_id, "RANK": "1"})
    code = ("import sys, time; from runner.jobs.supervisor import register_worker; "
            "register_worker(sys.argv[1]) if sys.argv[2] == 'register' else None; time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "no", "-m", "runner.train.worker"], env=env)
    rank = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), "register"], env=env)
    try:
        assert wait_for(lambda: worker_processes(run_id, tmp_path) == [rank.pid], timeout_s=30, poll_s=0.3)
        entry = WorkerEntry.model_validate_json(worker_pid_path(tmp_path, 1).read_text())
        assert entry.pid == rank.pid and entry.rank == 1
        worker_pid_path(tmp_path, 2).write_text(json.dumps({"pid": launcher.pid}))  # off the contract: no rank
        assert worker_processes(run_id, tmp_path) == [rank.pid]
        write_model(worker_pid_path(tmp_path, 1), entry.model_copy(update={"create_time": entry.create_time - 5}))
        assert worker_processes(run_id, tmp_path) == []  # same pid, other start time: not our rank
        assert worker_processes(run_id) == []  # no run folder, no registrations
    finally:
        for proc in (launcher, rank):
            proc.kill()
            proc.wait()
