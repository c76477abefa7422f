"""Trainer callbacks and the heartbeat thread of the worker.

- ``MetricsCallback`` appends one JSON object per log/eval to ``metrics.jsonl`` (rank 0 only).
- ``StopOnRequest`` turns a SIGUSR1 flag into "save a checkpoint now, then stop".
- ``AdaLoraCallback`` calls ``update_and_allocate`` after every optimizer step (a plain Trainer does not).
- ``Heartbeat`` rewrites ``heartbeat.json`` every few seconds from a daemon thread.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from runner.jobs import runfiles

#: Seconds between heartbeat rewrites (contract: "rewritten every 5 s").
HEARTBEAT_INTERVAL_S = 5.0


def memory_bytes() -> int:
    """Memory in use by this process: CUDA allocated bytes on GPU, else resident set size (bytes)."""
    import torch

    if torch.cuda.is_initialized():
        return int(torch.cuda.memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_memory() -> runfiles.PeakMemory:
    """The peak of this process: allocated CUDA memory on a GPU run, else the CPU's maximum resident set size.

    ``ru_maxrss`` is in kilobytes on Linux (getrusage(2)); bytes on macOS.
    """
    import resource
    import sys

    import torch

    if torch.cuda.is_initialized():
        return runfiles.PeakMemory(kind="cuda_max_allocated", bytes=int(torch.cuda.max_memory_allocated()))
    rss = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return runfiles.PeakMemory(kind="cpu_max_rss", bytes=rss if sys.platform == "darwin" else rss * 1024)


class Progress:
    """Shared, thread-safe view of where training is (read by the heartbeat)."""

    def __init__(self):
        self.step = 0
        self.max_steps = 0
        self.phase = "setup"  # setup | load | eval_before | train | eval_after | save | done
        self.lock = threading.Lock()

    def update(self, **kw) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self, k, v)


class Heartbeat:
    """Daemon thread that rewrites heartbeat.json (``runner.jobs.runfiles.Heartbeat``)."""

    def __init__(self, path: Path, progress: Progress, interval_s: float = HEARTBEAT_INTERVAL_S):
        self.path, self.progress, self.interval_s = path, progress, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        with self.progress.lock:
            beat = runfiles.Heartbeat(pid=os.getpid(), step=self.progress.step, max_steps=self.progress.max_steps,
                                      phase=self.progress.phase, time=time.time())
        runfiles.write_model(self.path, beat)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except OSError:  # disk full or folder removed: the job manager notices the stale heartbeat
                pass

    def stop(self) -> None:
        self._stop.set()
        self.beat()


class MetricsCallback(TrainerCallback):
    """Appends train and eval lines to metrics.jsonl (fields of the run-folder contract).

    Tokens are the Trainer's ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen="non_padding"``:
    the Trainer gathers every rank's count each step), so tokens/s is that of the whole run, all ranks.
    """

    def __init__(self, path: Path, progress: Progress, write: bool = True):
        self.path, self.progress, self.write = path, progress, write
        self.start_time = None
        self.start_step = 0
        self.start_tokens = 0
        self.last_time = None
        self.last_tokens = 0

    def _append(self, row: runfiles.TrainRow | runfiles.EvalRow) -> None:
        if self.write:
            runfiles.append_metrics(self.path, row)

    def on_train_begin(self, args, state, control, **kw):
        self.start_time = self.last_time = time.perf_counter()
        self.start_step = state.global_step
        self.start_tokens = self.last_tokens = state.num_input_tokens_seen  # restored from a checkpoint on resume
        self.progress.update(step=state.global_step, max_steps=state.max_steps, phase="train")

    def on_step_end(self, args, state, control, **kw):
        self.progress.update(step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" not in logs or self.start_time is None:
            return
        now = time.perf_counter()
        tokens = state.num_input_tokens_seen
        elapsed = now - self.start_time
        done = state.global_step - self.start_step
        eta = elapsed / done * (state.max_steps - state.global_step) if done else None
        window = now - self.last_time
        self._append(runfiles.TrainRow(
            step=state.global_step, epoch=round(state.epoch or 0.0, 4),
            loss=logs.get("loss"), learning_rate=logs.get("learning_rate"),  # Trainer log keys, present or not
            grad_norm=logs.get("grad_norm"),
            tokens_per_s=(tokens - self.last_tokens) / window if window > 0 else None,
            elapsed_s=round(elapsed, 3), eta_s=round(eta, 1) if eta is not None else None,
            memory_bytes=memory_bytes(), max_steps=state.max_steps, time=time.time(),
        ))
        self.last_time, self.last_tokens = now, tokens

    def session_tokens(self, state) -> int:
        """Training tokens (all ranks, no padding) since this ``train()`` call began."""
        return state.num_input_tokens_seen - self.start_tokens

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        metrics = metrics or {}
        if "eval_loss" in metrics:
            self._append(runfiles.EvalRow(step=state.global_step, epoch=round(state.epoch or 0.0, 4),
                                          eval_loss=metrics["eval_loss"], memory_bytes=memory_bytes(),
                                          max_steps=state.max_steps, time=time.time()))


class StopOnRequest(TrainerCallback):
    """When ``flag`` is set (by the SIGUSR1 handler), save a checkpoint at the end of this step and stop.

    ``agree`` turns this rank's flag into the decision of all ranks (runner.launch.distributed.any_rank: one
    all-reduce), so every rank stops at the same step; identity when single-process.
    """

    def __init__(self, flag: threading.Event, agree=None):
        self.flag = flag
        self.agree = agree or bool
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kw):
        if self.agree(self.flag.is_set()):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class AdaLoraCallback(TrainerCallback):
    """AdaLoRA's rank allocation: ``update_and_allocate(step)`` after each optimizer step, while the gradients
    still exist (Trainer zeroes them right after ``on_optimizer_step``)."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def on_optimizer_step(self, args, state, control, **kw):
        self.model.base_model.update_and_allocate(state.global_step)
        self.calls += 1
