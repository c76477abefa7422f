"""One detached supervisor per run: waits its turn for the device, runs the worker, records how it ended.

``python -m runner.jobs.supervisor --registry REGISTRY --run-id ID RUN_DIR``

The job manager starts it in its own session (so it is the leader of a new process group and survives the app,
the CLI or the terminal going away). It:

1. waits in the queue: first queued run (by queue time) whose supervisor is alive, and holder of an exclusive
   ``flock`` on ``device.lock`` next to the registry (the kernel drops the lock when its holders die, so a
   crashed run never blocks the device);
2. starts the worker command (``runner.launch.distributed.launch_command``; ``--resume`` for a resumed run) in the same
   process group, stdout and stderr appended to ``log.txt`` (a file, never a pipe), the lock fd inherited;
3. copies the worker's heartbeat into the registry every few seconds;
4. on SIGTERM (cancel) forwards it to every process of the run, then SIGKILL after a grace period;
5. classifies the exit (``runner.jobs.failures``), kills anything of the run still alive, writes the final status.

Every process of a run carries ``FTADVISOR_RUN_ID=<id>`` in its environment (inherited through torchrun, whose
ranks start in sessions of their own), which is how cancel finds all of them and how "no orphans" is checked.
Stop-and-save (SIGUSR1) goes only to the training processes that registered in ``RUN_DIR/workers/`` once they
could handle it (``register_worker``), never to a launcher; ranks that register after the request get it from
the supervisor's loop.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from pydantic import ValidationError

from runner.errors import RunnerError
from runner.jobs.registry import ACTIVE, Registry, RunRecord
from runner.jobs.runfiles import RESULT_FILE, WorkerEntry, read_heartbeat, write_model

RUN_ENV = "FTADVISOR_RUN_ID"
#: Replaces the worker command (``python -m runner.train.worker``) when set; used by tests with a stand-in worker.
WORKER_CMD_ENV = "FTADVISOR_WORKER_CMD"
LOCK_FILE = "device.lock"
#: Seconds between queue checks and between worker polls (small: the queue is a handful of rows).
POLL_S = 0.5
#: Seconds between heartbeat copies into the registry; the worker rewrites heartbeat.json every 5 s (contract).
HEARTBEAT_COPY_S = 5.0
#: Seconds without a heartbeat after which a live worker is reported as possibly hung (24 missed 5 s beats;
#: generous because a heavily swapping machine can stall the heartbeat thread for a while).
HEARTBEAT_STALE_S = 120.0


def heartbeat_stale_s() -> float:
    """``HEARTBEAT_STALE_S``, or ``FTADVISOR_HEARTBEAT_STALE_S`` when set (tests)."""
    return float(os.environ.get("FTADVISOR_HEARTBEAT_STALE_S", HEARTBEAT_STALE_S))
#: Seconds a queued row without a registered supervisor is still presumed to be starting (python start-up on a
#: loaded 2-core machine takes a few seconds; 60 s leaves a wide margin).
LAUNCH_GRACE_S = 60.0


def cancel_grace_s() -> float:
    """Seconds between SIGTERM and SIGKILL on cancel. The worker exits within a step on SIGTERM; 10 s covers a
    slow CPU step. ``FTADVISOR_CANCEL_GRACE_S`` overrides it."""
    return float(os.environ.get("FTADVISOR_CANCEL_GRACE_S", "10"))


# -- processes of a run -----------------------------------------------------------------------------------
#: Process states that are gone in all but name (psutil's names for ps's Z and X).
_DEAD = frozenset({psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD})


def pid_alive(pid: int | None) -> bool:
    """True when a process with this id exists and is not a zombie."""
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() not in _DEAD
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists; we may not look at it


def is_run_process(pid: int | None, run_id: str) -> bool:
    """True when ``pid`` is alive (not a zombie) and belongs to run ``run_id``."""
    if not pid_alive(pid):
        return False
    try:
        return psutil.Process(pid).environ().get(RUN_ENV) == run_id
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def run_processes(run_id: str | None = None) -> dict[str, list[int]]:
    """Live processes of each run (or of one run), found by the environment marker. {run_id: [pid, ...]}.

    Processes of other users, whose environment cannot be read, are not ours and are skipped."""
    found: dict[str, list[int]] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["environ", "status"], ad_value=None):
        env, status = proc.info["environ"], proc.info["status"]
        rid = env.get(RUN_ENV) if env else None
        if rid is None or proc.pid == me or status in _DEAD or (run_id is not None and rid != run_id):
            continue
        found.setdefault(rid, []).append(proc.pid)
    return found


def signal_run(run_id: str, sig: int, *, pgid: int | None = None, exclude: tuple[int, ...] = ()) -> list[int]:
    """Send ``sig`` to the run's process group and to every process carrying its marker. Returns the pids."""
    pids = [p for p in run_processes(run_id).get(run_id, []) if p not in exclude]
    if pgid and pgid not in exclude and os.getpgid(0) != pgid:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    return pids


#: Folder of the run where every training process (each rank) registers itself: ``workers/rank<N>.json``.
WORKERS_DIR = "workers"


def worker_pid_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / WORKERS_DIR / f"rank{int(rank)}.json"


def register_worker(run_dir: Path) -> Path:
    """Mark this process as a training process of the run (call once its SIGUSR1 handler is installed): writes
    ``workers/rank<RANK>.json`` with its pid and start time. Stop-and-save signals exactly these processes, so
    a launcher (torchrun, accelerate launch, whose elastic agent dies of SIGUSR1) never gets the signal, and a
    process is never signalled before it can handle it."""
    rank = int(os.environ.get("RANK", "0"))
    path = worker_pid_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = psutil.Process()
    write_model(path, WorkerEntry(pid=me.pid, rank=rank, create_time=me.create_time()))
    return path


def clear_workers(run_dir: Path) -> None:
    """Forget the previous attempt's registrations (before a new attempt starts)."""
    for pattern in ("rank*.json", "pid*.stop"):
        for path in (Path(run_dir) / WORKERS_DIR).glob(pattern):
            path.unlink(missing_ok=True)


def _claim_stop(run_dir: Path, pid: int) -> bool:
    """True for the one caller that may send this process its stop (SIGUSR1): the job manager and the supervisor
    both deliver a request, and a second SIGUSR1 that lands while the worker's interpreter shuts down (its
    handlers already reset) kills it with -10 instead of exit 6 (seen in CI). ``O_EXCL`` makes the claim atomic
    across processes."""
    try:
        fd = os.open(Path(run_dir) / WORKERS_DIR / f"pid{int(pid)}.stop", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def worker_processes(run_id: str, run_dir: Path | None = None) -> list[int]:
    """The training processes of a run, one per rank, as they registered in ``run_dir/workers/``
    (``register_worker``): alive, carrying the run's marker and started when they said (so a reused pid is
    not taken for a rank). Not the supervisor, not the launcher. Empty without a run folder or registrations."""
    if run_dir is None:
        return []
    pids = []
    for path in sorted((Path(run_dir) / WORKERS_DIR).glob("rank*.json")):
        try:  # a half-gone or foreign file is no registration (write_model renames whole files into place)
            entry = WorkerEntry.model_validate_json(path.read_text(encoding="utf-8"))
            pid = entry.pid
            same = abs(psutil.Process(pid).create_time() - entry.create_time) < 0.01
        except (OSError, ValidationError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if same and is_run_process(pid, run_id):
            pids.append(pid)
    return pids


def request_stop(run_id: str, run_dir: Path, already: set[int] | None = None) -> list[int]:
    """SIGUSR1 (stop and save) to the run's registered training processes not in ``already``; returns them."""
    sent = []
    for pid in worker_processes(run_id, run_dir):
        if already is not None and pid in already:
            continue
        if not _claim_stop(run_dir, pid):
            continue
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            continue
        sent.append(pid)
    return sent


def kill_run(run_id: str, *, grace_s: float, pgid: int | None = None, exclude: tuple[int, ...] = ()) -> bool:
    """SIGTERM every process of the run, wait up to ``grace_s``, then SIGKILL what is left. True when none is
    left afterwards (waits up to 5 s more for the kernel to reap them)."""
    if not signal_run(run_id, signal.SIGTERM, pgid=pgid, exclude=exclude):
        return True
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not [p for p in run_processes(run_id).get(run_id, []) if p not in exclude]:
            return True
        time.sleep(0.1)
    signal_run(run_id, signal.SIGKILL, pgid=pgid, exclude=exclude)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not [p for p in run_processes(run_id).get(run_id, []) if p not in exclude]:
            return True
        time.sleep(0.1)
    return False


# -- reconcile (shared with the job manager) ----------------------------------------------------------------
def reconcile(registry: Registry, run_id: str, alive: bool) -> bool:
    """Settle a queued/running row whose processes are all gone: the worker's result.json if it wrote one,
    otherwise failed with the reason. ``alive`` is whether any process of the run exists. Returns True when
    the row was changed. Safe against the supervisor finishing at the same moment (checked in one transaction).
    """
    from runner.jobs.failures import classify

    if alive:
        return False

    def decide(rec: RunRecord) -> dict | None:
        if rec.status not in ACTIVE:
            return None
        now = time.time()
        if rec.status == "queued" and rec.pid is None and now - rec.queued_at.timestamp() < LAUNCH_GRACE_S:
            return None  # its supervisor is still starting
        if rec.status == "queued":
            status, kind = ("cancelled", "cancelled") if rec.requested == "cancel" else ("failed", "lost")
            reason = ("cancelled while queued" if status == "cancelled" else
                      "the run's supervisor disappeared while the run was queued (the machine rebooted?)")
            fix = f"resume it: ftadvisor runs resume {run_id}"
            exit_code = None
        else:
            started_at = rec.started_at.timestamp() if rec.started_at else None
            outcome = classify(rec.run_dir, None, run_id=run_id, requested=rec.requested, started_at=started_at)
            status, kind, reason, fix, exit_code = (outcome.status, outcome.kind, outcome.reason, outcome.fix,
                                                    outcome.exit_code)
            if kind == "lost" and rec.heartbeat_at:
                age = now - rec.heartbeat_at.timestamp()
                reason = (f"lost heartbeat: the run's processes disappeared without a result (last heartbeat "
                          f"{age:.0f} s ago at step {rec.step}); the host may have killed it (out of RAM?) "
                          f"or the machine rebooted")
        return dict(status=status, kind=kind, reason=reason, fix=fix, exit_code=exit_code, ended_at=now,
                    requested=None)

    return registry.settle(run_id, decide)


# -- the supervisor itself ----------------------------------------------------------------------------------
class Supervisor:
    def __init__(self, registry: Registry, run_id: str, run_dir: Path):
        self.registry = registry
        self.run_id = run_id
        self.run_dir = Path(run_dir)
        self.cancel_requested = False
        self.worker: subprocess.Popen | None = None
        self.stop_sent: set[int] = set()  # ranks sent SIGUSR1 after a stop-and-save request

    def _on_term(self, signum, frame) -> None:
        self.cancel_requested = True

    def _on_usr1(self, signum, frame) -> None:
        pass  # SIGUSR1 ("stop and save") is for the worker, SIGHUP for terminals: the supervisor must outlive both

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        # Handlers, not SIG_IGN: an ignored signal stays ignored in the worker after exec, a handler does not.
        signal.signal(signal.SIGHUP, self._on_usr1)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        self.registry.update(self.run_id, pid=os.getpid(), pgid=os.getpgid(0), only_if_status=ACTIVE)
        lock_fd = self._wait_turn()
        if lock_fd is None:
            return 0
        try:  # the device stays locked until the outcome is recorded, so the next run starts after it ended
            returncode, started = self._run_worker(lock_fd)
            self._finish(returncode, started)
        finally:
            os.close(lock_fd)
        return 0

    def _first_in_line(self) -> bool:
        """True when no live queued run was queued before this one."""
        now = time.time()
        queued = self.registry.queue()
        ids = [rec.id for rec in queued]
        if self.run_id not in ids:
            return False
        for rec in queued[: ids.index(self.run_id)]:
            if rec.pid is None and now - rec.queued_at.timestamp() < LAUNCH_GRACE_S:
                return False  # its supervisor is still starting
            if is_run_process(rec.pid, rec.id) or run_processes(rec.id):
                return False
            reconcile(self.registry, rec.id, alive=False)
        return True

    def _wait_turn(self) -> int | None:
        fd = os.open(self.registry.path.parent / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            rec = self.registry.get(self.run_id)
            if rec is None or rec.status != "queued" or self.cancel_requested or rec.requested == "cancel":
                os.close(fd)
                if rec is not None and rec.status == "queued":
                    self.registry.update(self.run_id, status="cancelled", kind="cancelled", ended_at=time.time(),
                                         reason="cancelled while queued", requested=None,
                                         only_if_status=frozenset({"queued"}))
                return None
            if self._first_in_line():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                else:
                    if self.registry.update(self.run_id, status="running", started_at=time.time(),
                                            heartbeat_at=time.time(), attempts=rec.attempts + 1,
                                            only_if_status=frozenset({"queued"})):
                        return fd
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    continue
            time.sleep(POLL_S)

    def _command(self, resume: bool) -> list[str]:
        from runner.spec import RunSpec

        spec = RunSpec.load(self.run_dir / "spec.json")
        override = os.environ.get(WORKER_CMD_ENV)
        if override:  # tests: a stand-in worker that follows the same contract
            return [*shlex.split(override), str(self.run_dir)] + (["--resume"] if resume else [])
        from runner.launch.distributed import launch_command

        return launch_command(spec, self.run_dir) + (["--resume"] if resume else [])

    def _run_worker(self, lock_fd: int) -> tuple[int, float]:
        from ftcore.paths import REPO_ROOT

        rec = self.registry.get(self.run_id)
        started = rec.started_at.timestamp() if rec.started_at else time.time()
        result = self.run_dir / RESULT_FILE
        if result.exists():  # a previous attempt's result: keep it, but out of the way
            result.rename(self.run_dir / f"result.attempt-{max(rec.attempts - 1, 0)}.json")
        cmd = self._command(rec.resume)
        clear_workers(self.run_dir)
        env = dict(os.environ, **{RUN_ENV: self.run_id, "PYTHONUNBUFFERED": "1"})
        with open(self.run_dir / "log.txt", "ab", buffering=0) as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
            log.write(f"[ftadvisor] {stamp} UTC attempt {rec.attempts}: {' '.join(cmd)}\n".encode())
            self.worker = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           cwd=REPO_ROOT, env=env, pass_fds=(lock_fd,))
        self.registry.update(self.run_id, worker_pid=self.worker.pid)
        kill_at = None
        last_beat = 0.0
        while True:
            try:
                returncode = self.worker.wait(timeout=POLL_S)
            except subprocess.TimeoutExpired:
                returncode = None
            if returncode is not None:
                return returncode, started
            if self.cancel_requested and kill_at is None:
                signal_run(self.run_id, signal.SIGTERM, exclude=(os.getpid(),))
                kill_at = time.monotonic() + cancel_grace_s()
            if kill_at is not None and time.monotonic() > kill_at:
                signal_run(self.run_id, signal.SIGKILL, exclude=(os.getpid(),))
                kill_at = float("inf")
            if time.monotonic() - last_beat >= min(HEARTBEAT_COPY_S, heartbeat_stale_s() / 2):
                last_beat = time.monotonic()
                self._copy_heartbeat()
                self._forward_stop()

    def _forward_stop(self) -> None:
        """After a stop-and-save request, SIGUSR1 to the ranks that registered since (a rank still starting up
        when the request came is signalled once it can handle it)."""
        rec = self.registry.get(self.run_id)
        if rec is not None and rec.requested == "stop":
            self.stop_sent.update(request_stop(self.run_id, self.run_dir, self.stop_sent))

    def _copy_heartbeat(self) -> None:
        """Copy heartbeat.json into the registry; note a worker that stopped beating (hung, or swapping)."""
        try:
            beat = read_heartbeat(self.run_dir)
        except RunnerError:  # off the contract: counts as no beat, so a stale worker is still reported below
            beat = None
        rec = self.registry.get(self.run_id)
        if beat is not None:
            self.registry.update(self.run_id, heartbeat_at=beat.time, step=beat.step, max_steps=beat.max_steps)
            rec = self.registry.get(self.run_id)
        last = rec.heartbeat_at.timestamp() if rec.heartbeat_at else None
        if self.worker is not None and self.worker.poll() is None and last is not None:
            age = time.time() - last
            stale = age > heartbeat_stale_s()
            if stale:
                self.registry.update(self.run_id, reason=f"no heartbeat for {age:.0f} s: the worker may be hung "
                                     "or the machine is swapping (it is still running)",
                                     only_if_status=frozenset({"running"}))
            elif rec.reason and rec.reason.startswith("no heartbeat"):
                self.registry.update(self.run_id, reason=None, only_if_status=frozenset({"running"}))

    def _finish(self, returncode: int, started: float) -> None:
        from runner.jobs.failures import classify

        kill_run(self.run_id, grace_s=2.0, exclude=(os.getpid(),))  # no orphans, whatever the worker left
        self._copy_heartbeat()
        rec = self.registry.get(self.run_id)
        requested = "cancel" if self.cancel_requested else rec.requested
        outcome = classify(self.run_dir, returncode, run_id=self.run_id, requested=requested, started_at=started)
        self.registry.update(self.run_id, status=outcome.status, kind=outcome.kind, reason=outcome.reason,
                             fix=outcome.fix, exit_code=returncode, ended_at=time.time(), requested=None,
                             only_if_status=frozenset({"running"}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.jobs.supervisor")
    parser.add_argument("run_dir")
    parser.add_argument("--registry", required=True)
    parser.add_argument("--run-id", required=True)
    args = parser.parse_args(argv)
    return Supervisor(Registry(args.registry), args.run_id, Path(args.run_dir)).run()


if __name__ == "__main__":
    sys.exit(main())
