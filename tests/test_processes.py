"""Process control of runs through psutil: liveness (zombies count as gone) and the environment marker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from runner.jobs.supervisor import RUN_ENV, is_run_process, pid_alive, run_processes, worker_processes


def _wait_for(cond, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_marked_process_is_found_and_a_zombie_is_not(tmp_path):
    run_id = f"test-{os.getpid()}-{time.monotonic_ns()}"
    env = dict(os.environ, **{RUN_ENV: run_id})
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], env=env,
                             stdin=subprocess.PIPE)
    try:
        assert _wait_for(lambda: run_processes(run_id).get(run_id) == [child.pid])
        assert pid_alive(child.pid) and is_run_process(child.pid, run_id)
        assert not is_run_process(child.pid, run_id + "-other") and run_id not in run_processes("other-run")
        assert worker_processes(run_id) == []  # not a runner.train.worker command line
        child.stdin.close()  # it exits; not reaped yet, so it is a zombie until wait()
        assert _wait_for(lambda: not pid_alive(child.pid))
        assert not is_run_process(child.pid, run_id) and run_id not in run_processes(run_id)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid) and not pid_alive(None) and not pid_alive(0)
