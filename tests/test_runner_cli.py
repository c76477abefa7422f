"""`ftadvisor run` / `ftadvisor runs` with the stand-in worker (tests/jobs_fake_worker.py); the real worker
through the CLI is in test_jobs_real.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftadvisor.cli import main
from runner.jobs.supervisor import run_processes

REPO = Path(__file__).resolve().parents[1]
FAKE_WORKER = Path(__file__).with_name("jobs_fake_worker.py")


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("FTADVISOR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTADVISOR_WORKER_CMD", f"{sys.executable} {FAKE_WORKER}")
    monkeypatch.setenv("FTADVISOR_CANCEL_GRACE_S", "3")
    monkeypatch.setenv("FAKE_STEPS", "4")
    monkeypatch.setenv("FAKE_STEP_S", "0.05")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    # `run` refuses a model it cannot find before queueing; the stand-in worker never reads the files, so a
    # folder holding the names runner.models.check_model_dir looks for stands in for a model folder
    stub = tmp_path / "tiny-model"
    stub.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (stub / name).write_text("{}")
    monkeypatch.chdir(tmp_path)
    return data


def _base(data):
    return ["run", "--model", str(data.parent / "tiny-model"), "--method", "lora", "--dataset", str(data)]


def test_foreground_run_prints_progress_and_exits_0(env, capsys):
    assert main(_base(env) + ["--rank", "8", "--lr", "1e-4", "--max-steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "step 1/4  loss 3.0000  1,000 tok/s  ETA 0:00:00" in out  # the stand-in logs loss 3/step
    assert "step 4/4" in out and "completed" in out
    listed = main(["runs", "list", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert listed == 0 and len(rows) == 1
    row = rows[0]
    assert {"id", "status", "method", "model", "output_dir", "created_at", "reason"} <= set(row)
    assert row["status"] == "completed" and row["method"] == "lora"
    spec = json.loads((Path(row["output_dir"]) / "spec.json").read_text())
    assert spec["peft"]["r"] == 8 and spec["learning_rate"] == 1e-4 and spec["max_steps"] == 4


def test_failed_run_exits_1_with_reason_fix_and_log(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "oom")
    assert main(_base(env)) == 1
    err = capsys.readouterr().err
    assert "failed: out of memory at step 3" in err and "fix: lower micro_batch_size" in err
    assert "CUDA out of memory" in err  # the last log lines


def test_detach_json_returns_at_once(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "10000")
    t0 = time.monotonic()
    assert main(_base(env) + ["--detach", "--json"]) == 0
    assert time.monotonic() - t0 < 3
    rec = json.loads(capsys.readouterr().out)
    assert rec["status"] in ("queued", "running") and rec["id"]
    assert main(["runs", "cancel", rec["id"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "cancelled"
    assert not run_processes(rec["id"])


@pytest.mark.parametrize("argv, field", [
    (["--rank", "0"], "peft.r"),
    (["--batch-size", "0"], "micro_batch_size"),
    (["--strategy", "zero9"], "distribution.strategy"),
    (["--precision", "fp8"], "precision"),
    (["--master-dtype", "bf16"], "master_dtype"),  # pure 16-bit is for full fine-tuning; the base run is LoRA
    (["--qlora-regime", "nf8"], "qlora_regime"),
])
def test_bad_flags_exit_2_naming_the_field(env, capsys, argv, field):
    assert main(_base(env) + argv) == 2
    assert field in capsys.readouterr().err


def test_bad_sources_exit_2(env, capsys, tmp_path):
    assert main(["run"]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["run", "--model", "m"]) == 2
    assert "dataset" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.json")]) == 2
    assert "spec: no such file" in capsys.readouterr().err
    assert main(["run", "--model", "tiny-model", "--dataset", str(tmp_path / "none.jsonl")]) == 2
    assert "dataset.path" in capsys.readouterr().err
    assert main(["run", "--model", "m", "--dataset", str(env)]) == 2
    assert "model 'm' is not a catalog id, an existing folder or a hub id" in capsys.readouterr().err
    assert main(["runs", "show", "nope"]) == 2
    assert "run_id" in capsys.readouterr().err


def test_spec_file_with_overrides_and_distribution_flags(env, capsys, tmp_path):
    spec = {"model": "tiny-model", "method": "lora", "dataset": {"path": str(env)}, "peft": {"r": 4}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    assert main(["run", str(path), "--alpha", "8", "--targets", "q_proj,v_proj", "--dora",
                 "--nproc-per-node", "1", "--strategy", "fsdp", "--offload", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    saved = json.loads((Path(rec["output_dir"]) / "spec.json").read_text())
    assert saved["peft"]["r"] == 4 and saved["peft"]["alpha"] == 8 and saved["peft"]["use_dora"] is True
    assert saved["peft"]["target_modules"] == ["q_proj", "v_proj"]
    assert saved["distribution"]["strategy"] == "fsdp" and saved["distribution"]["offload"] is True


def test_show_logs_stop_resume(env, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_STEPS", "400")
    assert main(_base(env) + ["--detach", "--json", "--save-steps", "5"]) == 0
    rid = json.loads(capsys.readouterr().out)["id"]
    metrics = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        from runner.jobs.manager import JobManager

        metrics = JobManager().metrics(rid)
        if len(metrics) >= 2:
            break
        time.sleep(0.05)
    assert main(["runs", "stop", rid, "--wait"]) == 0
    assert "stop: stopped" in capsys.readouterr().out
    assert main(["runs", "show", rid]) == 0
    shown = capsys.readouterr().out
    assert "status:    stopped" in shown and "last:      step" in shown
    assert main(["runs", "logs", rid, "-n", "5"]) == 0
    assert "fake worker pid" in capsys.readouterr().out  # the stand-in prints 2 lines after the header
    monkeypatch.setenv("FAKE_STEPS", "6")
    assert main(["runs", "resume", rid]) == 0
    assert "completed" in capsys.readouterr().out


def test_sweep_command_prints_the_table(env, capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": "tiny-model", "method": "lora", "dataset": {"path": str(env)}}))
    assert main(["runs", "sweep", str(spec), "--ranks", "2,4"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "trainable params" in line)
    assert "trainable params" in lines[header] and "adapter size" in lines[header]
    r2, r4 = lines[header + 1].split(), lines[header + 2].split()
    assert r2[:3] == ["2", "4", "200"] and r4[:3] == ["4", "8", "400"]  # rank, alpha (2r), stand-in params
    assert main(["runs", "sweep", str(spec), "--ranks", "2,x"]) == 2


def test_ctrl_c_in_foreground_cancels_and_leaves_nothing(env, tmp_path):
    env_vars = dict(os.environ, FAKE_STEPS="100000", FAKE_MODE="child", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ftadvisor.cli"] + _base(env), cwd=REPO, env=env_vars,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()  # "run <id> queued in <folder>"
        assert first.startswith("run "), first
        rid = first.split()[1]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(run_processes(rid).get(rid, [])) >= 3:  # supervisor, worker, grandchild
                break
            time.sleep(0.1)
        assert len(run_processes(rid).get(rid, [])) >= 3, "the run never started"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "cancelled" in err
    assert not run_processes(rid), "a process survived Ctrl-C"


def test_cli_killed_during_a_run_does_not_lose_it(env, tmp_path, capsys):
    """The foreground CLI dies (SIGKILL: no chance to clean up); the run goes on and a new CLI sees it."""
    env_vars = dict(os.environ, FAKE_STEPS="40", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "ftadvisor.cli"] + _base(env), cwd=REPO, env=env_vars,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        rid = proc.stdout.readline().split()[1]
        assert proc.stdout.readline().startswith(("running", "step", "queued"))
    finally:
        proc.kill()
        proc.wait()
    assert main(["runs", "show", rid, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["status"] in ("queued", "running")
    from runner.jobs.manager import JobManager

    assert JobManager().wait(rid, timeout_s=30).status == "completed"


def test_demo_spec_with_overrides(env, capsys):
    assert main(["run", "--demo", "--max-steps", "3", "--rank", "4", "--detach", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    spec = json.loads((Path(rec["output_dir"]) / "spec.json").read_text())
    assert spec["model"] == "smollm2-135m" and spec["max_steps"] == 3 and spec["peft"]["r"] == 4
    assert spec["dataset"]["path"].endswith("demo_sentiment.jsonl")
    from runner.jobs.manager import JobManager

    assert JobManager().wait(rec["id"], timeout_s=30).status == "completed"  # (stand-in worker)


# ------------------------------------------------------------------------------ the dispatcher's error output


def _ftadvisor(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, FTADVISOR_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "ftadvisor", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_command_line_prints_a_runner_error_and_its_fix_without_a_traceback(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    res = _ftadvisor(tmp_path, "run", "--model", "./no-such-folder", "--method", "lora", "--dataset", "train.jsonl")
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith(("error:", "fix:"))]
    # runner.models.parse_model_ref's message and fix for a missing folder, each once
    assert lines == ["error: model folder './no-such-folder' does not exist",
                     "fix: check the path, or give a catalog id (ftadvisor models) or a hub id (owner/name)"]
    assert "Traceback" not in res.stderr


def test_command_line_prints_an_estimator_error_without_a_traceback(tmp_path):
    res = _ftadvisor(tmp_path, "estimate", "--model", "no-such-model")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "error: model: unknown model 'no-such-model'" in res.stderr and "Traceback" not in res.stderr
    assert "fix:" not in res.stderr  # this one names its fix in the message and has no separate fix


@pytest.mark.parametrize("error", ["ftcore.errors.UserError", "estimator.errors.EstimatorError",
                                   "advisor.errors.AdvisorError", "runner.errors.RunnerError"])
def test_every_user_error_type_prints_message_and_fix(error, monkeypatch, capsys):
    import argparse
    import importlib

    import ftadvisor.cli as cli

    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)

    def fail(args):
        raise cls("rank: must be between 1 and 1024 (got 0)", field="rank", fix="pass --rank 16")

    parser = argparse.ArgumentParser()
    parser.set_defaults(func=fail)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main([]) == 2
    assert capsys.readouterr().err == "error: rank: must be between 1 and 1024 (got 0)\nfix: pass --rank 16\n"


# ------------------------------------------------------------------------------ the fit check before a launch


def test_run_refuses_what_the_estimate_says_does_not_fit(env, capsys):
    # SmolLM2-135M LoRA at 64 x 8192 tokens: the logits alone are 64 x 8192 x 49152 x 4 B = 96 GiB, far above a
    # T4's 15 GiB (nvidia-smi total, data/gpus.csv): refused before anything is queued, naming the way out
    assert main(["run", "--demo", "--gpu", "t4", "--batch-size", "64", "--seq-len", "8192"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "NVIDIA T4 16GB" in err and "--no-fit-check" in err
    assert main(["runs", "list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    # --no-fit-check launches it anyway (the stand-in worker runs it)
    assert main(["run", "--demo", "--gpu", "t4", "--batch-size", "64", "--seq-len", "8192", "--no-fit-check",
                 "--detach"]) == 0


def test_run_names_its_fit_on_the_card_here(env, capsys, monkeypatch):
    # a CUDA device as torch reports an A100 80GB (name; total memory ~1% below nvidia-smi's 81920 MiB) is the
    # catalog's a100-80gb, and the demo's default run fits it
    from runner import cli

    monkeypatch.setattr(cli, "_cuda_device", lambda: ("NVIDIA A100-SXM4-80GB", int(0.99 * 81920 * 2**20)))
    assert main(["run", "--demo", "--max-steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "fit check: fits:" in out and "NVIDIA A100 SXM4 80GB" in out and "margin" in out


@pytest.mark.parametrize("name, card", [
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("Tesla T4", "t4"), ("NVIDIA RTX PRO 6000 Blackwell", None)])
def test_a_cuda_device_is_matched_to_its_catalog_card(name, card):
    # device names as torch.cuda.get_device_properties reports them; same memory (A100 vs H100 80GB, RTX 3090 vs
    # 4090) is told apart by the chip, same chip (A100 40 vs 80GB) by the memory; an unknown card is no card
    from estimator.catalog import get_gpu
    from runner.cli import _catalog_card

    total = int(0.99 * get_gpu(card).usable_bytes) if card else 96 * 2**30
    found = _catalog_card(name, total)
    assert (found.id if found else None) == card
