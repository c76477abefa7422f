"""The training recipe on a tiny real model: every method trains a few real steps and saves the right files."""

from __future__ import annotations

import os

# Spinning OpenMP threads starve each other on the shared 2-core machine (see runner/train/worker.py); set before
# torch is first imported in this test session.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import math

import pytest
from safetensors import safe_open

from runner.spec import DatasetSpec, PeftSettings, RunSpec

STEPS = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 arithmetic chats (the tiny tokenizer's corpus is arithmetic, so the texts tokenize compactly)."""
    path = tmp_path_factory.mktemp("ds") / "add.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(40):
            fh.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                                              {"role": "assistant", "content": str(2 * i + 3)}]}) + "\n")
    return path


def _spec(model_dir, dataset, **kw) -> RunSpec:
    fields = dict(model=str(model_dir), dataset=DatasetSpec(path=str(dataset), eval_fraction=0.1),
                  max_steps=STEPS, micro_batch_size=4, seq_len=64, save_steps=STEPS, learning_rate=1e-2,
                  precision="fp32", warmup_ratio=0.0, lr_scheduler="constant")
    fields.update(kw)
    return RunSpec(**fields)


def _train(spec, run_dir):
    from runner.train import recipe

    run_dir.mkdir(parents=True, exist_ok=True)
    return recipe.run(spec, run_dir)


def _report(run_dir) -> dict:
    return json.loads((run_dir / "report.json").read_text())


def _adapter_keys(run_dir) -> list[str]:
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _check_run(run_dir, adapter=True):
    rep = _report(run_dir)
    assert rep["steps"] == STEPS
    assert math.isfinite(rep["first_loss"]) and math.isfinite(rep["final_loss"])
    assert math.isfinite(rep["eval_loss_before"]) and math.isfinite(rep["eval_loss_after"])
    assert (run_dir / f"checkpoint-{STEPS}" / "trainer_state.json").is_file()
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["type"] == "train"]
    assert [x["step"] for x in train] == list(range(1, STEPS + 1))
    assert all(x["tokens_per_s"] > 0 and x["memory_bytes"] > 0 and x["max_steps"] == STEPS for x in train)
    assert any(x["type"] == "eval" for x in lines)
    # what the real worker wrote reads back through the run-folder contract, field for field
    from runner.jobs.runfiles import read_metrics, read_report

    assert read_report(run_dir).model_dump(mode="json") == rep
    assert [row.model_dump(mode="json") for row in read_metrics(run_dir / "metrics.jsonl")] == lines
    out = run_dir / ("adapter" if adapter else "model")
    assert (out / "tokenizer.json").is_file()
    if adapter:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        assert rep["adapter_bytes"] == (out / "adapter_model.safetensors").stat().st_size
        assert not list(out.glob("*.bin"))
    else:
        assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    return rep


def test_full(tiny_model_dir, dataset, tmp_path):
    r = _train(_spec(tiny_model_dir, dataset, method="full"), tmp_path / "run")
    rep = _check_run(tmp_path / "run", adapter=False)
    assert rep["trainable_params"] == rep["total_params"] == sum(p.numel() for p in r.model.parameters())
    assert rep["final_loss"] < rep["first_loss"]  # lr 1e-2 on a 143k-param model: 4 steps already lower it


def test_lora_trains_and_changes_b(tiny_model_dir, dataset, tmp_path):
    r = _train(_spec(tiny_model_dir, dataset, peft=PeftSettings(r=4, alpha=8, target_modules="attention-qv")),
               tmp_path / "run")
    rep = _check_run(tmp_path / "run")
    # LoRA on q_proj and v_proj of 2 layers, hidden 64, kv 2 heads x 16: r*(64+64) + r*(64+32) per layer
    assert rep["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(b) == 4 and all(t.abs().sum() > 0 for t in b)  # B starts at zero; training moved it
    assert r.trainer.args.use_cpu and rep["device"] == "cpu"


def test_rslora_and_dora(tiny_model_dir, dataset, tmp_path):
    peft = PeftSettings(r=4, alpha=8, use_rslora=True, use_dora=True, target_modules="attention-qv")
    r = _train(_spec(tiny_model_dir, dataset, peft=peft), tmp_path / "run")
    _check_run(tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["use_dora"] is True
    assert any("lora_magnitude_vector" in k for k in _adapter_keys(tmp_path / "run"))
    layer = r.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA: alpha / sqrt(r)


def test_qlora_real_4bit(tiny_model_dir, dataset, tmp_path):
    pytest.importorskip("bitsandbytes")
    r = _train(_spec(tiny_model_dir, dataset, method="qlora", peft=PeftSettings(r=4, target_modules="all-linear")),
               tmp_path / "run")
    _check_run(tmp_path / "run")
    kinds = {type(m).__name__ for m in r.model.modules()}
    assert "Linear4bit" in kinds
    q = r.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert q.weight.quant_state.quant_type == "nf4" and q.weight.quant_state.nested  # double quantization
    if r.precision == "bf16":  # the QLoRA paper's regime (the default): norms fp32, embeddings and LM head bf16
        dtypes = {n: str(p.dtype) for n, p in r.model.named_parameters()
                  if str(p.dtype) != "torch.uint8" and "lora_" not in n}
        assert {d for n, d in dtypes.items() if "norm" in n} == {"torch.float32"}
        assert {d for n, d in dtypes.items() if "norm" not in n} == {"torch.bfloat16"}


def test_loraplus_optimizer_groups(tiny_model_dir, dataset, tmp_path):
    peft = PeftSettings(variant="loraplus", r=4, loraplus_lr_ratio=16.0)
    r = _train(_spec(tiny_model_dir, dataset, peft=peft), tmp_path / "run")
    _check_run(tmp_path / "run")
    lrs = sorted({g["initial_lr"] for g in r.trainer.optimizer.param_groups if g["params"]})
    assert lrs == [pytest.approx(1e-2), pytest.approx(1e-2 * 16)]  # A at lr, B at lr * ratio


def test_adalora_reallocates_ranks(tiny_model_dir, dataset, tmp_path):
    peft = PeftSettings(variant="adalora", r=8, adalora_target_r=2, target_modules="attention")
    r = _train(_spec(tiny_model_dir, dataset, peft=peft, max_steps=10, save_steps=10), tmp_path / "run")
    rep = _report(tmp_path / "run")
    assert rep["adalora_update_calls"] == 10  # once per optimizer step
    ranks = rep["adalora_rank_pattern"]
    assert ranks and len(ranks) == 8  # 4 projections x 2 layers
    # budget target_r * modules = 16 of the initial 8 * 8 = 64 ranks; allocation is uneven across modules
    assert sum(ranks.values()) == 2 * 8 and max(ranks.values()) <= 8
    assert math.isfinite(rep["final_loss"])


def test_gpt2_and_gradient_checkpointing(tmp_path, dataset):
    from runner.train.tinymodel import build_tiny_model

    model = build_tiny_model(tmp_path / "gpt2", arch="gpt2")
    _train(_spec(model, dataset, gradient_checkpointing=True, peft=PeftSettings(r=2, target_modules="attention-qv")),
           tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn"]


def test_bad_target_preset(tiny_model_dir, dataset, tmp_path):
    from runner.errors import RunnerError

    with pytest.raises(RunnerError, match="adalora_target_r"):
        _train(_spec(tiny_model_dir, dataset, peft=PeftSettings(variant="adalora", r=4, adalora_target_r=4)),
               tmp_path / "run")
