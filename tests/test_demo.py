"""The offline demo: spec shape (fast) and the real run on SmolLM2-135M-Instruct (slow, minutes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.train.demo import DEMO_EVAL, DEMO_TRAIN, demo_spec

REPO = Path(__file__).resolve().parents[1]


def test_demo_spec_and_shipped_data():
    spec = demo_spec(max_steps=3)
    assert spec.model == "smollm2-135m" and spec.method == "lora" and spec.max_steps == 3
    assert spec.dataset.eval_path == str(DEMO_EVAL)
    for path, rows in ((DEMO_TRAIN, 320), (DEMO_EVAL, 40)):
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
        assert len(lines) == rows
        labels = {x["messages"][-1]["content"] for x in lines}
        assert labels == {"positive", "negative"}


def test_demo_data_is_reproducible(tmp_path):
    """The committed files are exactly what the committed generator writes."""
    script = DEMO_TRAIN.parent / "make_demo_sentiment.py"
    copy = tmp_path / script.name
    copy.write_text(script.read_text(encoding="utf-8"), encoding="utf-8")
    subprocess.run([sys.executable, str(copy)], check=True)
    assert (tmp_path / DEMO_TRAIN.name).read_bytes() == DEMO_TRAIN.read_bytes()
    assert (tmp_path / DEMO_EVAL.name).read_bytes() == DEMO_EVAL.read_bytes()


@pytest.mark.slow
def test_real_demo_run_improves_exact_match(tmp_path):
    """Full demo through the worker: base SmolLM2 answers in sentences (0 exact matches, measured), the LoRA
    adapter answers with the label word."""
    pytest.importorskip("gguf")
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    demo_spec().save(run_dir / "spec.json")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call([sys.executable, "-m", "runner.train.worker", str(run_dir)], cwd=REPO, stdout=log,
                               stderr=subprocess.STDOUT, env=env, timeout=3600)
    assert code == 0, (run_dir / "log.txt").read_text()[-3000:]
    rep = json.loads((run_dir / "report.json").read_text())
    assert rep["exact_match_rows"] == 40
    assert rep["exact_match_before"] <= 0.05
    assert rep["exact_match_after"] >= 0.8
    assert rep["eval_loss_after"] < rep["eval_loss_before"]
