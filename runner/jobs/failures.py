"""Turn the end of a worker process into a status, a kind, a reason and a fix.

Sources, most trusted first: the worker's own ``result.json`` (it knows whether it ran out of memory at load,
at a step or at eval), the exit code (``runner/exitcodes.py``), the signal that ended it (SIGKILL from the
kernel's out-of-memory killer looks exactly like ``kill -9``), and patterns in the last lines of the log.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from pydantic import BaseModel

from runner import exitcodes
from runner.errors import RunnerError
from runner.jobs.runfiles import METRICS_FILE, Result, TrainRow, read_metrics, read_result

#: Log lines kept with a failure (enough for a Python traceback's last frames and the error line).
LOG_TAIL_LINES = 40

#: Worker exit code -> (kind, reason, fix) when no result.json explains it (the worker died before writing it).
_EXIT_CODE_HINTS: dict[int, tuple[str, str, str]] = {
    exitcodes.BAD_SPEC: ("bad_spec", "the run spec or model folder is invalid",
                         "fix the field named in the log and launch again"),
    exitcodes.DATASET: ("dataset", "the dataset check failed",
                        "fix the rows named in the log (format, columns, encoding) and launch again"),
    exitcodes.MISSING_DEPENDENCY: ("missing_dependency", "a required package is missing",
                                   "install the package named in the log into this environment"),
    exitcodes.OUT_OF_MEMORY: ("oom_step", "out of memory",
                              "lower micro_batch_size or seq_len, enable gradient checkpointing, or use QLoRA"),
    exitcodes.STOPPED: ("stopped", "stopped and saved on request", "resume it to continue from the checkpoint"),
    exitcodes.RESUME_REFUSED: ("resume_refused", "resume refused: the base model, method or dataset changed",
                               "launch a new run instead of resuming this one"),
}

_OOM_PATTERNS = (
    re.compile(r"CUDA out of memory|OutOfMemoryError|out of memory", re.I),
    re.compile(r"DefaultCPUAllocator: can't allocate memory|\bMemoryError\b|Cannot allocate memory"),
)
_MISSING_MODULE = re.compile(r"No module named '([\w.]+)'")
_TORCHRUN_SIGNAL = re.compile(r"exitcode\s*:\s*-(\d+)")
_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Interrupt))\b:?\s*(.*)$")


class Outcome(BaseModel):
    """How an attempt ended. ``status`` is the registry status; ``signal`` is set when a signal ended it."""

    status: str
    kind: str | None = None
    reason: str | None = None
    fix: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    log_tail: str = ""


def tail_lines(path: Path, n: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    """The last ``n`` lines of a text file (reads at most ``max_bytes`` from its end); '' when missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", errors="replace").splitlines()
    return "\n".join(lines[-n:])


def run_log_tail(run_dir: Path, n: int = LOG_TAIL_LINES) -> str:
    """Last lines of ``log.txt``, plus rank 0's log when the run was distributed (its traceback is there)."""
    run_dir = Path(run_dir)
    text = tail_lines(run_dir / "log.txt", n)
    rank0 = run_dir / "log.rank0.txt"
    if rank0.exists():
        text = tail_lines(rank0, n) + ("\n--- launcher (log.txt) ---\n" + text if text else "")
    return text


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _killed(signum: int, run_id: str) -> tuple[str, str, str]:
    name = signal_name(signum)
    resume = f"then resume it: ftadvisor runs resume {run_id}" if run_id else "then resume it"
    if signum == signal.SIGKILL:
        return ("killed",
                "killed by signal 9 (SIGKILL): the host may have run out of RAM (the kernel's out-of-memory "
                "killer sends SIGKILL) or another process killed it",
                "check `dmesg | grep -i 'out of memory'`; if RAM ran out, lower micro_batch_size or seq_len, "
                f"enable gradient checkpointing or use QLoRA; {resume}")
    return ("killed", f"killed by signal {signum} ({name}) sent by another process or the host",
            f"find out what sent {name} (a scheduler time limit, a logout, a manual kill); {resume}")


def _oom_kind(run_dir: Path, log_tail: str) -> str:
    if re.search(r"evaluat|eval_loop|evaluation_loop|prediction_step", log_tail):
        return "oom_eval"
    try:
        has_steps = any(isinstance(row, TrainRow) for row in read_metrics(run_dir / METRICS_FILE))
    except RunnerError:  # a metrics file of another worker version: it did log steps
        has_steps = True
    return "oom_step" if has_steps else "oom_load"


_OOM_TEXT = {
    "oom_load": ("out of memory while loading the model",
                 "use QLoRA (4-bit base) or a smaller model, or a GPU with more memory"),
    "oom_step": ("out of memory at a training step",
                 "lower micro_batch_size or seq_len (raise gradient_accumulation_steps to keep the batch), "
                 "enable gradient checkpointing, or use QLoRA"),
    "oom_eval": ("out of memory during evaluation",
                 "lower micro_batch_size (eval uses the same batch size) or seq_len, or evaluate less often"),
}


def _from_log(run_dir: Path, log_tail: str) -> tuple[str, str, str] | None:
    if any(p.search(log_tail) for p in _OOM_PATTERNS):
        kind = _oom_kind(run_dir, log_tail)
        return (kind, *_OOM_TEXT[kind])
    missing = _MISSING_MODULE.search(log_tail)
    if missing:
        module = missing.group(1).split(".")[0]
        return ("missing_dependency", f"missing Python package: {module}",
                f"install it into this environment: pip install {module}")
    return None


def _last_exception(log_tail: str) -> str | None:
    for line in reversed(log_tail.splitlines()):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return line.strip()
    return None


def classify(run_dir: Path, returncode: int | None, *, run_id: str = "", requested: str | None = None,
             started_at: float | None = None) -> Outcome:
    """Classify one attempt. ``returncode`` is ``Popen.returncode`` (negative = killed by that signal) or None
    when the process was lost (nobody saw it exit). ``requested`` is a pending "cancel" / "stop" request."""
    run_dir = Path(run_dir)
    log_tail = run_log_tail(run_dir)
    result: Result | None
    try:
        result = read_result(run_dir, newer_than=None if started_at is None else started_at - 1)
    except RunnerError as exc:  # a result.json off the contract: classify from the exit code, and say so
        result = None
        log_tail = f"{log_tail}\n[ftadvisor] {exc}".lstrip("\n")
    signum = -returncode if returncode is not None and returncode < 0 else None
    if signum is None and returncode not in (None, 0):
        match = _TORCHRUN_SIGNAL.search(log_tail)  # torchrun exits 1 and logs the rank's signal
        if match and not result:
            signum = int(match.group(1))
    base = dict(exit_code=returncode, signal=signum, log_tail=log_tail)

    if requested == "cancel":
        return Outcome(status="cancelled", kind="cancelled", reason="cancelled on request",
                       fix=f"resume it to continue from the last checkpoint: ftadvisor runs resume {run_id}",
                       **base)
    if returncode == 0 and (result is None or result.status == "completed"):
        return Outcome(status="completed", **base)
    if returncode is None and result is not None and result.status == "completed":
        return Outcome(status="completed", **base)  # nobody saw the exit, but the worker finished its work
    if result is not None and result.status in ("failed", "stopped", "cancelled"):
        return Outcome(status=result.status, kind=result.kind, reason=result.reason, fix=result.fix, **base)
    if requested == "stop" and (returncode == exitcodes.STOPPED or signum is not None):
        saved = returncode == exitcodes.STOPPED
        return Outcome(status="stopped", kind="stopped",
                       reason="stopped and saved on request" if saved else
                       "stopped on request before the worker could save (it was still starting)",
                       fix=f"resume it: ftadvisor runs resume {run_id}", **base)
    if signum is not None:
        kind, reason, fix = _killed(signum, run_id)
        return Outcome(status="failed", kind=kind, reason=reason, fix=fix, **base)
    if returncode is None:
        return Outcome(status="failed", kind="lost", reason="the run's processes disappeared without a result "
                       "(the machine rebooted, or the host killed the run and its supervisor)",
                       fix=f"resume it: ftadvisor runs resume {run_id}", **base)
    hint = _from_log(run_dir, log_tail)
    if hint is None and returncode in _EXIT_CODE_HINTS:
        hint = _EXIT_CODE_HINTS[returncode]
    if hint is None:
        last = _last_exception(log_tail)
        hint = ("error", f"the worker exited with code {returncode}" + (f": {last}" if last else ""),
                "read the last log lines below; fix the cause and resume or relaunch")
    elif returncode == exitcodes.OUT_OF_MEMORY and hint[0] == "oom_step":
        kind = _oom_kind(run_dir, log_tail)
        hint = (kind, *_OOM_TEXT[kind])
    kind, reason, fix = hint
    last = _last_exception(log_tail)
    if last and last not in reason and kind != "error":
        reason = f"{reason} ({last})"
    return Outcome(status="failed", kind=kind, reason=reason, fix=fix, **base)
