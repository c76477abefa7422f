"""The job manager and CLI with the real worker (``python -m runner.train.worker``) on the tiny model.

The default test runs one real LoRA job end to end through ``ftadvisor run`` (about 30 s on the loaded 2-core
machine, most of it importing torch/transformers in the worker); the fault scenarios with the real worker are
marked slow (each starts the worker two or three times).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.jobs.sweep import launch_sweep

from runner.jobs.manager import JobManager
from runner.spec import RunSpec
from runner.jobs.supervisor import run_processes

REPO = Path(__file__).resolve().parents[1]
DEMO_ROWS = REPO / "data" / "datasets" / "demo_sentiment.jsonl"


@pytest.fixture
def dataset(tmp_path):
    """40 chat rows of the shipped sentiment task (messages format)."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(DEMO_ROWS.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    return path


def _spec(model_dir, dataset, **kw) -> RunSpec:
    base = dict(model=str(model_dir), method="lora", dataset={"path": str(dataset)}, seq_len=64,
                precision="fp32", device="cpu", micro_batch_size=2, save_steps=2, eval_steps=2)
    return RunSpec.model_validate(base | kw)


def _wait_step(manager, run_id, step, timeout_s=120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(m.type == "train" and m.step >= step for m in manager.metrics(run_id)):
            return True
        if manager.get(run_id).finished:
            return False
        time.sleep(0.05)
    return False


def test_real_tiny_run_through_the_cli(tiny_model_dir, dataset, tmp_path):
    env = dict(os.environ, FTADVISOR_HOME=str(tmp_path / "home"))
    env.pop("FTADVISOR_WORKER_CMD", None)
    cmd = [sys.executable, "-m", "ftadvisor.cli", "run", "--model", str(tiny_model_dir), "--method", "lora",
           "--dataset", str(dataset), "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
           "--seq-len", "64", "--precision", "fp32", "--device", "cpu", "--rank", "4", "--json"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(out.stdout)
    assert rec["status"] == "completed" and rec["exit_code"] == 0
    assert "step 4/4" in out.stderr and "tok/s" in out.stderr  # progress lines (stderr under --json)
    run_dir = Path(rec["output_dir"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4]
    assert any(r["type"] == "eval" and r["eval_loss"] > 0 for r in rows)
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    report = json.loads((run_dir / "report.json").read_text())
    # Tiny llama (tinymodel.py): hidden 64, 2 layers, 4 heads x 16, 2 KV heads -> q_proj 64->64, v_proj 64->32.
    # LoRA on q and v at rank 4: 2 layers x 4 x ((64 + 64) + (64 + 32)) = 1,792 trainable parameters.
    assert report["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert not run_processes(rec["id"])



@pytest.mark.slow
def test_real_sigkill_mid_run_queue_and_resume(tiny_model_dir, dataset, tmp_path):
    manager = JobManager(tmp_path / "runs")
    first = manager.launch(_spec(tiny_model_dir, dataset, max_steps=400, save_steps=5, eval_steps=100))
    second = manager.launch(_spec(tiny_model_dir, dataset, max_steps=3, name="second"))
    try:
        assert _wait_step(manager, first.id, 12), manager.log_tail(first.id)
        assert manager.get(second.id).status == "queued"  # one job on the device at a time
        os.kill(manager.get(first.id).worker_pid, signal.SIGKILL)
        failed = manager.wait(first.id, timeout_s=60)
        assert failed.status == "failed" and failed.kind == "killed", failed.reason
        assert "SIGKILL" in failed.reason
        kept = sorted(p.name for p in first.run_dir.glob("checkpoint-*"))
        assert kept, "checkpoints were lost"
        done = manager.wait(second.id, timeout_s=300)
        assert done.status == "completed", manager.log_tail(second.id)
        assert done.started_at >= failed.ended_at
        # Resume: fewer steps left, from the last checkpoint.
        spec_path = first.run_dir / "spec.json"
        spec = RunSpec.load(spec_path)
        spec.max_steps = 20
        spec.save(spec_path)
        manager.resume(first.id)
        resumed = manager.wait(first.id, timeout_s=300)
        assert resumed.status == "completed", manager.log_tail(first.id)
        report = json.loads((first.run_dir / "report.json").read_text())
        assert report["resumed_from"] and report["steps"] == 20
        assert manager.registry.integrity_ok()
        assert not run_processes(first.id) and not run_processes(second.id)
    finally:
        for rec in (first, second):
            manager.cancel(rec.id, grace_s=2)


@pytest.mark.slow
def test_real_resume_refused_when_dataset_changed(tiny_model_dir, dataset, tmp_path):
    manager = JobManager(tmp_path / "runs")
    rec = manager.launch(_spec(tiny_model_dir, dataset, max_steps=400, save_steps=5, eval_steps=100))
    try:
        assert _wait_step(manager, rec.id, 6), manager.log_tail(rec.id)
        assert manager.cancel(rec.id).status == "cancelled"
        with open(dataset, "a", encoding="utf-8") as fh:  # the data changed: a resume would mix two datasets
            fh.write(DEMO_ROWS.read_text(encoding="utf-8").splitlines()[50] + "\n")
        manager.resume(rec.id)
        out = manager.wait(rec.id, timeout_s=300)
        assert out.status == "failed" and out.kind == "resume_refused" and out.exit_code == 7, out.reason
        assert "dataset" in out.reason
    finally:
        manager.cancel(rec.id, grace_s=2)


@pytest.mark.slow
def test_real_stop_and_save_then_resume(tiny_model_dir, dataset, tmp_path):
    manager = JobManager(tmp_path / "runs")
    rec = manager.launch(_spec(tiny_model_dir, dataset, max_steps=400, save_steps=1000, eval_steps=1000))
    try:
        assert _wait_step(manager, rec.id, 3), manager.log_tail(rec.id)
        manager.stop_and_save(rec.id)
        stopped = manager.wait(rec.id, timeout_s=120)
        assert stopped.status == "stopped" and stopped.exit_code == 6, (stopped.reason, manager.log_tail(rec.id))
        assert list(rec.run_dir.glob("checkpoint-*")), "stop and save did not save a checkpoint"
    finally:
        manager.cancel(rec.id, grace_s=2)


@pytest.mark.slow
def test_real_two_process_run_cancel_leaves_no_rank_behind(tiny_model_dir, dataset, tmp_path):
    manager = JobManager(tmp_path / "runs")
    spec = _spec(tiny_model_dir, dataset, max_steps=2000, save_steps=1000, eval_steps=1000,
                 distribution={"nproc_per_node": 2})
    rec = manager.launch(spec)
    try:
        assert _wait_step(manager, rec.id, 2, timeout_s=240), manager.log_tail(rec.id)
        assert len(run_processes(rec.id)[rec.id]) >= 4  # supervisor, torchrun, two ranks
        out = manager.cancel(rec.id)
        assert out.status == "cancelled"
        assert not run_processes(rec.id), "a rank or launcher survived cancel"
    finally:
        manager.cancel(rec.id, grace_s=2)


@pytest.mark.slow
def test_real_rank_sweep_table(tiny_model_dir, dataset, tmp_path):
    from runner.jobs.sweep import sweep_rows

    manager = JobManager(tmp_path / "runs")
    records = launch_sweep(manager, _spec(tiny_model_dir, dataset, max_steps=4), [2, 8])
    rows = sweep_rows(manager, [manager.wait(r.id, timeout_s=300) for r in records])
    assert [r.status for r in rows] == ["completed", "completed"]
    # q_proj 64->64 and v_proj 64->32 in 2 layers: 2 x r x (128 + 96) = 448 r trainable parameters.
    assert [r.trainable_params for r in rows] == [448 * 2, 448 * 8]
    for row in rows:  # fp32 LoRA weights + a small safetensors JSON header
        assert 0 < row.adapter_bytes - 4 * row.trainable_params < 4096
        assert row.final_eval_loss > 0 and row.train_seconds > 0


@pytest.mark.slow
def test_real_adapters_commands(tiny_model_dir, dataset, tmp_path):
    """``ftadvisor adapters generate|merge|combine`` on adapters trained by two real runs (ranks 2 and 4)."""
    from ftadvisor.cli import main

    manager = JobManager(tmp_path / "runs")
    records = launch_sweep(manager, _spec(tiny_model_dir, dataset, max_steps=2), [2, 4])
    done = [manager.wait(r.id, timeout_s=300) for r in records]
    assert [d.status for d in done] == ["completed", "completed"]
    a, b = (str(d.run_dir / "adapter") for d in done)
    assert main(["adapters", "generate", "--base", str(tiny_model_dir), "--adapter", a, "--adapter", b,
                 "--each", "--prompt", "Label: great!", "--max-new-tokens", "3", "--json"]) == 0
    merged = tmp_path / "merged"
    assert main(["adapters", "merge", "--base", str(tiny_model_dir), "--adapter", a, "--output", str(merged)]) == 0
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    combined = tmp_path / "combined"
    assert main(["adapters", "combine", "--base", str(tiny_model_dir), "--adapter", a, "--adapter", b,
                 "--weights", "0.5,0.5", "--output", str(combined)]) == 0
    config = json.loads((combined / "adapter_config.json").read_text())
    assert config["r"] == 2 + 4  # "cat" concatenates the two adapters: rank 2 + rank 4 (peft)
    assert main(["adapters", "combine", "--base", str(tiny_model_dir), "--adapter", a,
                 "--output", str(tmp_path / "c")]) == 2  # combining needs two adapters
    assert main(["adapters", "combine", "--base", str(tiny_model_dir), "--adapter", a, "--adapter", b,
                 "--weights", "1", "--output", str(tmp_path / "c")]) == 2  # one weight per adapter

