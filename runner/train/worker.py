"""The training process: ``python -m runner.train.worker RUN_DIR [--resume]``.

Reads ``RUN_DIR/spec.json``, runs the recipe (``runner/train/recipe.py``), and always ends by writing ``result.json``
(``runner.jobs.runfiles.Result``: status completed | failed | stopped | cancelled, kind, reason, fix, exit code) and
exiting with a code from ``runner/exitcodes.py``. Signals: SIGUSR1 = stop and save (checkpoint, exit 6); SIGTERM = cancel
(exit at once). A heartbeat thread rewrites ``heartbeat.json`` every 5 s. Only rank 0 writes files.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting starve each other on a shared, oversubscribed CPU (measured here on
# 2 busy cores: a tiny model's forward took 76 ms per Linear with the default spin policy and about 1 ms with
# PASSIVE). Must be set before torch is imported; an explicit setting from the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

from ftcore.errors import UserError  # noqa: E402
from runner import exitcodes  # noqa: E402
from runner.train.callbacks import Heartbeat, Progress  # noqa: E402
from runner.errors import RunnerError  # noqa: E402
from runner.jobs.runfiles import HEARTBEAT_FILE, RESULT_FILE, Result, write_model  # noqa: E402

#: Exit status after SIGTERM: 128 + signal number, the shell convention for "killed by signal".
CANCEL_EXIT = 128 + signal.SIGTERM


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_result(run_dir: Path, status: str, code: int, kind: str | None = None, reason: str = "",
                 fix: str = "", *, field: str | None = None, step: int | None = None) -> None:
    """``result.json`` (rank 0 only)."""
    if _is_main():
        write_model(run_dir / RESULT_FILE, Result(status=status, kind=kind, reason=reason, fix=fix, exit_code=code,
                                                  time=time.time(), field=field, step=step))


def _load_spec(run_dir: Path):
    from pydantic import ValidationError

    from ftcore.errors import format_validation_error
    from runner.spec import RunSpec

    path = run_dir / "spec.json"
    if not path.is_file():
        raise RunnerError(f"{path} not found", field="spec", fix="write spec.json (RunSpec) into the run folder")
    try:
        return RunSpec.load(path)
    except ValidationError as exc:
        raise RunnerError(f"spec.json is invalid: {format_validation_error(exc)}", field="spec",
                          fix="fix the named fields of spec.json") from exc
    except ValueError as exc:  # not JSON at all
        raise RunnerError(f"spec.json is not valid JSON: {exc}", field="spec", fix="rewrite spec.json") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner.train.worker", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N")
    args = parser.parse_args(argv)
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    from runner.launch.distributed import finish_ranks, redirect_rank_output

    redirect_rank_output(run_dir)

    stop_flag = threading.Event()
    progress = Progress()

    def _on_usr1(signum, frame):  # stop and save: the StopOnRequest callback acts at the end of the step
        if not stop_flag.is_set():  # the job manager and the supervisor may both deliver the request
            print("worker: SIGUSR1 received, saving a checkpoint and stopping", flush=True)
        stop_flag.set()
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # one stop is enough; a late duplicate must not kill us

    def _on_term(signum, frame):  # cancel: leave now, no checkpoint
        print("worker: SIGTERM received, cancelling", flush=True)
        try:
            write_result(run_dir, "cancelled", CANCEL_EXIT, "cancelled", "cancelled by request (SIGTERM)",
                         "resume the run to continue from its last checkpoint")
        finally:
            os._exit(CANCEL_EXIT)

    signal.signal(signal.SIGUSR1, _on_usr1)
    signal.signal(signal.SIGTERM, _on_term)
    from runner.jobs.supervisor import register_worker

    register_worker(run_dir)  # now stop-and-save may signal this rank (runner/jobs/supervisor.py worker_processes)
    heartbeat = Heartbeat(run_dir / HEARTBEAT_FILE, progress).start() if _is_main() else None
    try:
        code = _run(run_dir, args.resume, stop_flag, progress)
    finally:
        if heartbeat:
            heartbeat.stop()
    return finish_ranks(code)  # multi-process: wait for rank 0's files, then let the other ranks exit 0


def _run(run_dir: Path, resume: bool, stop_flag: threading.Event, progress: Progress) -> int:
    try:
        spec = _load_spec(run_dir)
        from runner.train import recipe

        state = recipe.run(spec, run_dir, resume=resume, stop_flag=stop_flag, progress=progress)
    except RunnerError as exc:
        code = exc.exit_code
        status = "failed"
        print(f"worker: {exc.kind}: {exc}\nfix: {exc.fix}", file=sys.stderr, flush=True)
        write_result(run_dir, status, code, exc.kind, str(exc), exc.fix, field=exc.field)
        return code
    except UserError as exc:  # another package's input error (e.g. the estimator's target names)
        print(f"worker: bad_spec: {exc}", file=sys.stderr, flush=True)
        write_result(run_dir, "failed", exitcodes.BAD_SPEC, "bad_spec", str(exc),
                     "fix the named field of spec.json", field=getattr(exc, "field", None))
        return exitcodes.BAD_SPEC
    except KeyboardInterrupt:
        write_result(run_dir, "cancelled", CANCEL_EXIT, "cancelled", "interrupted", "resume the run")
        return CANCEL_EXIT
    except Exception as exc:  # last resort: keep the traceback in the log, the message in result.json
        traceback.print_exc()
        write_result(run_dir, "failed", exitcodes.ERROR, "error", f"{type(exc).__name__}: {exc}",
                     "see log.txt for the traceback")
        return exitcodes.ERROR
    if state.stopped:
        step = state.trainer.state.global_step
        write_result(run_dir, "stopped", exitcodes.STOPPED, "stopped",
                     f"stopped on request at step {step}; checkpoint-{step} saved",
                     "resume the run to continue", step=step)
        return exitcodes.STOPPED
    write_result(run_dir, "completed", exitcodes.COMPLETED, None, "training completed", "",
                 step=state.trainer.state.global_step)
    return exitcodes.COMPLETED


if __name__ == "__main__":
    sys.exit(main())
