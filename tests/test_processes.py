"""Process control of runs through psutil: liveness (zombies count as gone) and the environment marker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from jobs_helpers import wait_for
from runner.jobs.supervisor import RUN_ENV, is_run_process, pid_alive, run_processes, worker_processes


def test_a_marked_process_is_found_and_a_zombie_is_not(tmp_path):
    run_id = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, **{RUN_ENV: run_id})
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], env=env,
                             stdin=subprocess.PIPE)
    try:
        assert wait_for(lambda: run_processes(run_id).get(run_id) == [child.pid])
        assert pid_alive(child.pid) and is_run_process(child.pid, run_id)
        assert not is_run_process(child.pid, run_id + "-other") and run_id not in run_processes("other-run")
        assert worker_processes(run_id) == []  # not a runner.train.worker command line
        child.stdin.close()  # it exits; not reaped yet, so it is a zombie until wait()
        assert wait_for(lambda: not pid_alive(child.pid))
        assert not is_run_process(child.pid, run_id) and run_id not in run_processes(run_id)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid) and not pid_alive(None) and not pid_alive(0)


def test_stop_reaches_a_worker_once_whoever_asks(tmp_path):
    """The job manager and the supervisor both deliver a stop request; the worker gets exactly one SIGUSR1 (a second
    one landing while its interpreter shut down killed the fake worker with -10 instead of exit 6, in CI)."""
    from runner.jobs.supervisor import clear_workers, request_stop

    run_id = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, **{RUN_ENV: run_id})
    counter = tmp_path / "usr1.txt"
    code = ("import signal, sys, time\n"
            "from pathlib import Path\n"
            f"out = Path({str(counter)!r})\n"
            "signal.signal(signal.SIGUSR1, lambda s, f: out.open('a').write('x'))\n"
            "from runner.jobs.supervisor import register_worker\n"
            f"register_worker(Path({str(tmp_path)!r}))\n"
            "time.sleep(30)\n")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=os.getcwd())
    try:
        assert wait_for(lambda: worker_processes(run_id, tmp_path) == [child.pid])
        assert request_stop(run_id, tmp_path) == [child.pid]          # the job manager
        assert request_stop(run_id, tmp_path, already=set()) == []    # the supervisor's loop, not knowing the first
        assert wait_for(lambda: counter.is_file() and counter.read_text() == "x")
        time.sleep(0.3)
        assert counter.read_text() == "x"
        clear_workers(tmp_path)  # a new attempt (resume) may be stopped again
        assert not list((tmp_path / "workers").glob("*"))
    finally:
        child.kill()
        child.wait()
