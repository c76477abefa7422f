"""A stand-in for ``python -m runner.train.worker RUN_DIR [--resume]`` used by the job-manager tests.

It follows the worker contract without torch, writing the run files through the same models as the real worker
(``runner.jobs.runfiles``): heartbeat.json, metrics.jsonl rows, checkpoint-N/ folders, adapter/, report.json,
result.json, exit codes, SIGUSR1 = stop and save (exit 6), SIGTERM = exit promptly.
``FAKE_STEPS`` (default 20) steps of ``FAKE_STEP_S`` (default 0.1) seconds. ``FAKE_MODE``: ``ok``; ``oom`` (exit 5
with result.json oom_step at step 3); ``hang`` (stops beating at step 3 but stays alive); ``child`` (also starts
a grandchild in its own session, as torchrun does
with its ranks, to test that cancel leaves no orphans).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner.jobs.runfiles import (HEARTBEAT_FILE, METRICS_FILE, REPORT_FILE, RESULT_FILE, DatasetSummary, EvalRow,
                             Heartbeat, Report, Result, TrainRow, append_metrics, write_model)
from runner.spec import RunSpec

run_dir = Path(sys.argv[1])
resume = "--resume" in sys.argv
steps = int(os.environ.get("FAKE_STEPS", "20"))
step_s = float(os.environ.get("FAKE_STEP_S", "0.1"))
mode = os.environ.get("FAKE_MODE", "ok")
stop = {"flag": False}


def result(status, code, kind=None, reason="", fix=""):
    write_model(run_dir / RESULT_FILE, Result(status=status, kind=kind, reason=reason, fix=fix, exit_code=code,
                                              time=time.time()))


def _on_usr1(signum, frame):
    stop.update(flag=True)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as the real worker: one stop is enough


signal.signal(signal.SIGUSR1, _on_usr1)
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(143))
from runner.jobs.supervisor import register_worker  # noqa: E402  (after the handlers, as the real worker does)

register_worker(run_dir)
if mode == "child":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
start = 0
if resume:
    ckpts = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    start = ckpts[-1] if ckpts else 0
    print(f"resuming from step {start}", flush=True)
print(f"fake worker pid {os.getpid()} steps {steps}", flush=True)
for step in range(start + 1, steps + 1):
    time.sleep(step_s)
    append_metrics(run_dir / METRICS_FILE, TrainRow(step=step, max_steps=steps, loss=3.0 / step,
                                                     tokens_per_s=1000.0, eta_s=(steps - step) * step_s,
                                                     elapsed_s=step * step_s, time=time.time()))
    write_model(run_dir / HEARTBEAT_FILE, Heartbeat(pid=os.getpid(), step=step, max_steps=steps, phase="train",
                                                    time=time.time()))
    if step % 5 == 0 or stop["flag"]:
        (run_dir / f"checkpoint-{step}").mkdir(exist_ok=True)
    if mode == "hang" and step == 3:  # alive but silent: no more heartbeats
        time.sleep(600)
    if mode == "oom" and step == 3:
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
        result("failed", 5, "oom_step", "out of memory at step 3", "lower micro_batch_size")
        sys.exit(5)
    if stop["flag"]:
        result("stopped", 6, "stopped", f"stopped and saved at step {step}", "resume it")
        sys.exit(6)
append_metrics(run_dir / METRICS_FILE, EvalRow(step=steps, max_steps=steps, eval_loss=1.5, time=time.time()))
spec = RunSpec.load(run_dir / "spec.json")
rank = spec.peft.r
(run_dir / "adapter").mkdir(exist_ok=True)
(run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * (1000 * rank))  # size grows with rank
(run_dir / "adapter" / "tokenizer.json").write_text("{}")
write_model(run_dir / REPORT_FILE, Report(
    model=spec.model, model_dir=spec.model, method=spec.method, peft_variant=spec.peft.variant, rank=rank,
    device="cpu", precision="fp32", precision_requested=spec.precision,
    dataset=DatasetSummary(format="prompt_completion", rows=steps, path=spec.dataset.path),
    train_rows=steps, eval_rows=0, steps=steps, max_steps=steps, train_seconds=steps * step_s,
    final_loss=3.0 / steps, eval_loss_after=2.0 / rank, trainable_params=100 * rank, total_params=10_000,
    adapter_bytes=1000 * rank, output=str(run_dir / "adapter")))
result("completed", 0)
print("done", flush=True)
