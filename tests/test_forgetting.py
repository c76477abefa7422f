"""Forgetting: the general-text loss equals transformers' own loss; an untrained adapter (B = 0) changes nothing;
a run's report.json carries forgetting and intruder dimensions for LoRA and full runs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json

import pytest
import torch

from runner.tools import forgetting


def test_shipped_text_set():
    texts = forgetting.load_texts()
    assert len(texts) == 40 and all(len(t) > 60 for t in texts)
    assert (forgetting.data_path("general_eval", "README.md")).read_text().count("CC0") >= 1


def test_loss_matches_transformers(tiny_model_dir):
    """One text: our token-weighted loss equals the model's own labels=input_ids loss (its shift + mean)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = forgetting.load_texts()[0]
    ours, tokens = forgetting.general_loss(model, tok, [text])
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = model(input_ids=ids, labels=ids).loss.item()
    assert tokens == ids.shape[1] - 1
    assert ours == pytest.approx(theirs, rel=1e-5)
    # padding in a batch does not change the figure: two texts together = token-weighted mean of each alone
    a, na = forgetting.general_loss(model, tok, [forgetting.load_texts()[1]])
    both, nb = forgetting.general_loss(model, tok, [text, forgetting.load_texts()[1]])
    assert nb == tokens + na and both == pytest.approx((ours * tokens + a * na) / nb, rel=1e-5)


def test_untrained_adapter_forgets_nothing(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before, n = forgetting.general_loss(base, tok)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert all(float(p.detach().abs().sum()) == 0 for name, p in peft_model.named_parameters() if "lora_B" in name)
    after, _ = forgetting.general_loss(peft_model, tok)
    rep = forgetting.forgetting_report(before, after, n)
    assert rep.change == 0.0 and rep.texts == 40 and n > 500


@pytest.mark.parametrize("method", ["lora", "full"])
def test_report_has_forgetting_and_intruders(tiny_model_dir, tmp_path, method):
    from runner.train import recipe
    from runner.spec import DatasetSpec, PeftSettings, RunSpec

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}"}) + "\n"
                            for i in range(16)), encoding="utf-8")
    spec = RunSpec(model=str(tiny_model_dir), method=method, dataset=DatasetSpec(path=str(data), eval_fraction=0.25),
                   peft=PeftSettings(r=4, alpha=8, target_modules="attention-qv", dropout=0.0), max_steps=2,
                   micro_batch_size=8, seq_len=32, learning_rate=5e-2, precision="fp32", save_steps=100)
    recipe.run(spec, tmp_path / "run")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    f = rep["forgetting"]
    assert f["before"] > 0 and f["after"] > 0 and f["change"] == pytest.approx(f["after"] - f["before"])
    assert f["tokens"] > 500
    intr = rep["intruder_dimensions"]
    assert intr["source"] == ("full" if method == "full" else "lora")
    assert intr["summary"]["modules"] == 4  # 2 layers x (q_proj, v_proj): the same modules for full and LoRA
    assert intr["top_k"] == 10 and intr["epsilon"] == 0.5


def test_after_run_line(make_report):
    from runner.cli import after_run_line
    from runner.tools.intruder import IntruderReport, IntruderSummary

    intruders = IntruderReport(source="lora", top_k=10, epsilon=0.5, per_module=[], summary=IntruderSummary(
        modules=120, modules_total=120, total=3, mean_per_module=0.025, modules_with_intruders=3, seconds=1.0))
    rep = make_report(forgetting=forgetting.forgetting_report(3.25, 3.5, 1000), intruder_dimensions=intruders)
    assert after_run_line(rep) == ("general text (40 paragraphs): loss 3.25 -> 3.5 (+0.2500); "
                                   "intruder dimensions: 3 in 120 modules (top 10, |cos| < 0.5)")
    assert after_run_line(make_report()) is None
