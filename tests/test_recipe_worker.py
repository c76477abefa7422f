"""The worker as a process (the contract with the job manager): exit codes, result.json, signals, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner import exitcodes
from runner.spec import DatasetSpec, PeftSettings, RunSpec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("wds") / "add.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(48):
            fh.write(json.dumps({"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}"}) + "\n")
    return path


def _spec(model_dir, dataset, **kw) -> RunSpec:
    fields = dict(model=str(model_dir), dataset=DatasetSpec(path=str(dataset), eval_fraction=0.1),
                  max_steps=4, micro_batch_size=4, seq_len=32, save_steps=1000, precision="fp32",
                  peft=PeftSettings(r=4))
    fields.update(kw)
    return RunSpec(**fields)


def _start(run_dir: Path, spec: RunSpec | None, *args, env=None) -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    if spec is not None:
        spec.save(run_dir / "spec.json")
    log = open(run_dir / "log.txt", "a")
    return subprocess.Popen([sys.executable, "-m", "runner.train.worker", str(run_dir), *args], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def _run(run_dir, spec, *args, env=None, timeout=180) -> tuple[int, dict]:
    proc = _start(run_dir, spec, *args, env=env)
    code = proc.wait(timeout=timeout)
    return code, json.loads((run_dir / "result.json").read_text())


def _metrics(run_dir) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def test_bad_spec_exit_2(tmp_path):
    (tmp_path / "spec.json").write_text('{"model": "x", "method": "lora", "dataset": {"path": "d"}, '
                                        '"micro_batch_size": 0}')
    code, res = _run(tmp_path, None)
    assert code == exitcodes.BAD_SPEC == 2
    assert res["status"] == "failed" and res["kind"] == "bad_spec" and "micro_batch_size" in res["reason"]


def test_model_folder_without_weights_exit_2(tmp_path, tiny_model_dir, dataset):
    folder = tmp_path / "noweights"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_model_dir / name).read_bytes())
    code, res = _run(tmp_path / "run", _spec(folder, dataset))
    assert code == 2 and res["kind"] == "bad_spec" and "safetensors" in res["reason"] and res["fix"]


def test_dataset_error_exit_3_before_model_load(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n', encoding="utf-8")
    code, res = _run(tmp_path / "run", _spec(tiny_model_dir, bad))
    assert code == exitcodes.DATASET == 3
    assert res["kind"] == "dataset" and "row 2" in res["reason"]
    from runner.jobs.runfiles import DatasetSummary, read_model

    check = read_model(tmp_path / "run" / "dataset_check.json", DatasetSummary)  # a run-folder model
    assert check.ok is False and any("row 2" in e for e in check.errors)
    assert "Loading weights" not in (tmp_path / "run" / "log.txt").read_text()  # no model was loaded


def test_qlora_without_bitsandbytes_exit_4(tmp_path, tiny_model_dir, dataset):
    shim = tmp_path / "shim" / "bitsandbytes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('bitsandbytes hidden by the test')\n")
    env = {"PYTHONPATH": f"{shim.parent}{os.pathsep}{REPO}"}
    code, res = _run(tmp_path / "run", _spec(tiny_model_dir, dataset, method="qlora"), env=env)
    assert code == exitcodes.MISSING_DEPENDENCY == 4, (tmp_path / "run" / "log.txt").read_text()[-2000:]
    assert res["kind"] == "missing_dependency" and "pip install" in res["fix"]


def test_stop_and_save_then_resume_then_refuse(tmp_path, tiny_model_dir, dataset):
    run_dir = tmp_path / "run"
    spec = _spec(tiny_model_dir, dataset, max_steps=4000)
    proc = _start(run_dir, spec)
    deadline = time.time() + 120
    while time.time() < deadline and not any(m["type"] == "train" and m["step"] >= 2 for m in _metrics(run_dir)):
        assert proc.poll() is None, (run_dir / "log.txt").read_text()[-2000:]
        time.sleep(0.05)
    # the heartbeat is rewritten every 5 s (HEARTBEAT_INTERVAL_S): within 7 s it shows the training step
    until = time.time() + 7
    while (hb := json.loads((run_dir / "heartbeat.json").read_text()))["step"] < 1 and time.time() < until:
        time.sleep(0.1)
    assert hb["pid"] == proc.pid and hb["max_steps"] == 4000 and hb["step"] >= 1 and hb["phase"] == "train"
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == exitcodes.STOPPED == 6
    res = json.loads((run_dir / "result.json").read_text())
    step = res["step"]
    assert res["status"] == "stopped" and 2 <= step < 4000
    assert (run_dir / f"checkpoint-{step}" / "trainer_state.json").is_file()
    assert not (run_dir / "adapter").exists()  # stopped runs keep the checkpoint, not a final adapter

    # resume continues from the checkpoint step (shorter max_steps so the test stays fast)
    spec.max_steps = step + 3
    spec.save(run_dir / "spec.json")
    n_before = len(_metrics(run_dir))
    code, res = _run(run_dir, None, "--resume")
    assert code == 0 and res["status"] == "completed"
    new_steps = [m["step"] for m in _metrics(run_dir)[n_before:] if m["type"] == "train"]
    assert new_steps == [step + 1, step + 2, step + 3]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["resumed_from"].endswith(f"checkpoint-{step}") and report["steps"] == step + 3
    # the worker's own resume files are run-folder models too: the resumed run read them back through those
    from runner.jobs.runfiles import Evaluation, Fingerprint, read_model

    kept = read_model(run_dir / "baseline.json", Evaluation)
    assert kept.eval_loss == report["eval_loss_before"]  # 'before' is the first session's, not re-evaluated
    assert read_model(run_dir / "fingerprint.json", Fingerprint).model == spec.model

    # a changed dataset makes resume refuse, with the reason
    with open(dataset, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"prompt": "What is 99 plus 1?", "completion": " 100"}) + "\n")
    code, res = _run(run_dir, None, "--resume")
    assert code == exitcodes.RESUME_REFUSED == 7
    assert res["kind"] == "resume_refused" and "dataset" in res["reason"]


def test_sigterm_cancels_promptly(tmp_path, tiny_model_dir, dataset):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, _spec(tiny_model_dir, dataset, max_steps=5000))
    deadline = time.time() + 120
    while time.time() < deadline and not _metrics(run_dir):
        assert proc.poll() is None
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.time() - t0 < 10
    assert json.loads((run_dir / "result.json").read_text())["status"] == "cancelled"
