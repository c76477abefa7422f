"""The job manager: launch, list, cancel, stop, resume and watch training runs that outlive the app and the CLI.

A run is a folder (``spec.json``, ``log.txt``, ``metrics.jsonl``, checkpoints, adapter, ``result.json``) and a
row in the SQLite registry. ``launch`` writes both and starts a detached supervisor (``runner/jobs/supervisor.py``)
in a session of its own, which queues for the device, runs the worker and records the outcome; the caller
returns at once. Any process (a restarted app, another terminal) can pick the run up again by its id:
``get``/``list`` reconcile rows whose processes are gone.

    manager = JobManager()
    rec = manager.launch(spec)            # queued or running
    rec = manager.wait(rec.id, timeout_s=600)
    rec.status, rec.reason, rec.fix
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from ftcore.paths import REPO_ROOT, runs_dir as default_runs_dir
from runner.errors import RunnerError
from runner.jobs.failures import run_log_tail
from runner.jobs.registry import ACTIVE, TERMINAL, Registry, RunRecord, default_registry_path, new_run_id
from runner.jobs.runfiles import METRICS_FILE, EvalRow, TrainRow, read_metrics
from runner.spec import RunSpec
from runner.jobs.supervisor import (RUN_ENV, cancel_grace_s, kill_run, reconcile, request_stop, run_processes,
                               signal_run)

__all__ = ["JobManager", "RunRecord"]

#: Seconds between status checks in ``wait``.
WAIT_POLL_S = 0.5
#: Seconds ``wait`` gives a finished run's supervisor to exit after recording the outcome (it only closes files).
EXIT_WAIT_S = 5.0
#: Statuses a run can be resumed from.
RESUMABLE = frozenset({"failed", "stopped", "cancelled"})


def _absolute_spec(spec: RunSpec) -> RunSpec:
    """The spec with local paths made absolute: the worker runs from the repository root, not the caller's
    working directory."""
    data = spec.model_dump()
    ds = data["dataset"]
    for key in ("path", "eval_path"):
        if ds.get(key):
            ds[key] = str(Path(ds[key]).expanduser().resolve())
    model = Path(spec.model).expanduser()
    if model.exists():
        data["model"] = str(model.resolve())
    return RunSpec.model_validate(data)


def _check_launchable(spec: RunSpec) -> None:
    """Cheap checks before anything is written, so bad input fails at once (the worker checks the rest)."""
    for field, value in (("dataset.path", spec.dataset.path), ("dataset.eval_path", spec.dataset.eval_path)):
        if value and not Path(value).is_file():
            raise RunnerError(f"{field}: no such file {value!r}", field=field, kind="dataset",
                              fix="give the path of a JSONL, CSV or Parquet file")


class JobManager:
    """Runs under ``runs_dir`` (default ``ftcore.paths.runs_dir()``), registry in ``runs_dir/registry.sqlite3``.

    Every method reads the registry afresh, so several managers in several processes agree."""

    def __init__(self, runs_dir: str | Path | None = None):
        self.runs_dir = Path(runs_dir) if runs_dir is not None else default_runs_dir()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.registry = Registry(default_registry_path(self.runs_dir))

    # -- launching ----------------------------------------------------------------------------------------
    def launch(self, spec: RunSpec, *, sweep_id: str | None = None) -> RunRecord:
        """Create the run folder and registry row, start its supervisor, return at once (queued/running)."""
        spec = _absolute_spec(spec)
        _check_launchable(spec)
        run_id = new_run_id()
        run_dir = Path(spec.output_dir).expanduser().resolve() if spec.output_dir else self.runs_dir / run_id
        if (run_dir / "spec.json").exists():
            raise RunnerError(f"output_dir {str(run_dir)!r} already holds a run", field="output_dir",
                              fix="choose an empty folder, or resume that run with `ftadvisor runs resume ID`")
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(run_dir / "spec.json", json.dumps(spec.model_dump(mode="json"), indent=2) + "\n")
        self._write_engine_configs(spec, run_dir)
        rec = self.registry.insert(spec, run_dir, run_id=run_id, sweep_id=sweep_id)
        self._spawn(rec)
        return self.get(rec.id)

    @staticmethod
    def _write_engine_configs(spec: RunSpec, run_dir: Path) -> None:
        from runner.launch.distributed import write_engine_configs

        write_engine_configs(spec, run_dir)

    def _spawn(self, rec: RunRecord) -> None:
        """Start ``python -m runner.jobs.supervisor`` detached: own session, no pipes, output in supervisor.log."""
        cmd = [sys.executable, "-m", "runner.jobs.supervisor", "--registry", str(self.registry.path),
               "--run-id", rec.id, rec.output_dir]
        env = dict(os.environ, **{RUN_ENV: rec.id, "PYTHONUNBUFFERED": "1"})
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        try:
            with open(Path(rec.output_dir) / "supervisor.log", "ab") as log:
                proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO_ROOT, env=env, start_new_session=True, close_fds=True)
        except OSError as exc:
            self.registry.update(rec.id, status="failed", kind="error", ended_at=time.time(),
                                 reason=f"could not start the run's supervisor: {exc}",
                                 fix="check that the Python environment and the run folder are usable")
            raise RunnerError(f"could not start the run: {exc}", field="output_dir", kind="error") from exc
        self.registry.update(rec.id, pid=proc.pid, pgid=proc.pid, only_if_status=ACTIVE)
        # Reap it when it ends, so a long-lived app does not collect zombies (which would look alive).
        threading.Thread(target=proc.wait, name=f"reap-{rec.id}", daemon=True).start()

    # -- reading ------------------------------------------------------------------------------------------
    def get(self, run_id: str) -> RunRecord:
        """The run (an unambiguous id prefix is accepted), reconciled with its processes."""
        rec = self._lookup(run_id)
        if rec.status in ACTIVE:
            alive = bool(run_processes(rec.id).get(rec.id))
            if reconcile(self.registry, rec.id, alive):
                rec = self.registry.get(rec.id)
        return rec

    def _lookup(self, run_id: str) -> RunRecord:
        rec = self.registry.get(run_id)
        if rec is not None:
            return rec
        matches = self.registry.find(run_id) if run_id else []
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise RunnerError(f"run_id: no run {run_id!r} in {self.runs_dir}", field="run_id",
                              kind="bad_spec", fix="see `ftadvisor runs list` for the ids")
        ids = ", ".join(m.id for m in matches[:5])
        raise RunnerError(f"run_id: {run_id!r} matches several runs ({ids})", field="run_id",
                          kind="bad_spec", fix="give more of the id")

    def list(self) -> list[RunRecord]:
        """All runs, oldest first, reconciled with their processes (one psutil process-table scan for all)."""
        records = self.registry.list()
        active = [r for r in records if r.status in ACTIVE]
        if active:
            procs = run_processes()
            changed = [reconcile(self.registry, r.id, bool(procs.get(r.id))) for r in active]
            if any(changed):
                records = self.registry.list()
        return records

    def metrics(self, run_id: str) -> list[TrainRow | EvalRow]:
        """Rows of ``metrics.jsonl`` (train and eval), skipping a partly written last line."""
        return read_metrics(self._lookup(run_id).run_dir / METRICS_FILE)

    def log_tail(self, run_id: str, n: int = 50) -> str:
        """The last ``n`` lines of the run's log (rank 0's log first when distributed)."""
        return run_log_tail(self._lookup(run_id).run_dir, n)

    def wait(self, run_id: str, timeout_s: float | None = None) -> RunRecord:
        """Block until the run is finished or ``timeout_s`` seconds passed; returns the record either way
        (check ``.status``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            rec = self.get(run_id)
            if rec.status in TERMINAL:
                # The supervisor records the outcome, then exits: give it a moment, so that "finished" also
                # means "no process of the run left" for the caller.
                exit_by = time.monotonic() + EXIT_WAIT_S
                while run_processes(rec.id).get(rec.id) and time.monotonic() < exit_by:
                    time.sleep(0.05)
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                return rec
            time.sleep(WAIT_POLL_S)

    # -- control ------------------------------------------------------------------------------------------
    def cancel(self, run_id: str, *, grace_s: float | None = None) -> RunRecord:
        """Stop the run and every process it started (SIGTERM, SIGKILL after ``grace_s``). Blocks until they
        are gone (seconds). A finished run is returned unchanged."""
        rec = self.get(run_id)
        if rec.status in TERMINAL:
            return rec
        self.registry.update(rec.id, requested="cancel", only_if_status=ACTIVE)
        grace = cancel_grace_s() if grace_s is None else grace_s
        kill_run(rec.id, grace_s=grace, pgid=rec.pgid)
        self.registry.update(rec.id, status="cancelled", kind="cancelled", reason="cancelled on request",
                             fix=f"resume it to continue from the last checkpoint: ftadvisor runs resume {rec.id}",
                             ended_at=time.time(), requested=None, only_if_status=ACTIVE)
        return self.get(rec.id)

    def stop_and_save(self, run_id: str) -> RunRecord:
        """Ask the worker to save a checkpoint and stop (SIGUSR1); the run ends "stopped" and can be resumed.
        Returns at once. A queued run is simply cancelled (it has nothing to save)."""
        rec = self.get(run_id)
        if rec.status == "queued":
            return self.cancel(rec.id)
        if rec.status != "running":
            return rec
        self.registry.update(rec.id, requested="stop", only_if_status=ACTIVE)
        # SIGUSR1 to the training processes that registered in the run folder (never a launcher); a rank still
        # starting up gets it from the supervisor once it has registered (Supervisor._forward_stop)
        request_stop(rec.id, rec.run_dir)
        return self.get(rec.id)

    def resume(self, run_id: str) -> RunRecord:
        """Queue the run again with ``--resume`` in the same folder (from its last checkpoint). The worker
        refuses when the base model, method or dataset changed; that reason shows in the record."""
        rec = self.get(run_id)
        if rec.status not in RESUMABLE:
            raise RunnerError(f"run_id: run {rec.id} is {rec.status}; only a failed, stopped or cancelled run "
                              "can be resumed", field="run_id", kind="bad_spec",
                              fix="launch a new run" if rec.status == "completed" else "wait for it to finish")
        leftovers = run_processes(rec.id).get(rec.id)
        if leftovers:
            kill_run(rec.id, grace_s=2.0)
        changed = self.registry.update(
            rec.id, status="queued", queued_at=time.time(), resume=True, requested=None, pid=None, pgid=None,
            worker_pid=None, exit_code=None, kind=None, reason=None, fix=None, ended_at=None,
            only_if_status=RESUMABLE)
        if not changed:
            raise RunnerError(f"run_id: run {rec.id} changed while resuming; try again", field="run_id")
        self._spawn(self.registry.get(rec.id))
        return self.get(rec.id)

    def delete(self, run_id: str, *, files: bool = False) -> None:
        """Forget a finished run (and delete its folder when ``files``)."""
        rec = self.get(run_id)
        if rec.status in ACTIVE:
            raise RunnerError(f"run_id: run {rec.id} is {rec.status}; cancel it first", field="run_id")
        self.registry.delete(rec.id)
        if files:
            shutil.rmtree(rec.run_dir, ignore_errors=True)

    def processes(self, run_id: str) -> list[int]:
        """Live process ids of the run (supervisor, launcher, ranks)."""
        rec = self._lookup(run_id)
        return run_processes(rec.id).get(rec.id, [])

    def signal(self, run_id: str, sig: int) -> list[int]:
        """Send a signal to every process of the run (used by tests and tools)."""
        rec = self._lookup(run_id)
        return signal_run(rec.id, sig, pgid=rec.pgid)


def _write_atomic(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
