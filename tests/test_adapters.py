"""Adapters after training: generate, switch on one base, weighted combination, merge (logits checked by hand)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runner/train/worker.py: spinning OpenMP on a busy CPU

import json

import pytest
import torch
from safetensors.torch import load_file

from runner.tools import adapters
from runner.errors import RunnerError
from runner.spec import DatasetSpec, PeftSettings, RunSpec

TOL = 1e-5  # fp32 logits of the same computation in a different order (merged W vs W x + B A x)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Two LoRA adapters (different data, ranks 4 and 2) and one QLoRA adapter on the tiny Llama."""
    from runner.train import recipe

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, offset, method, rank in (("plus", 1, "lora", 4), ("times", 2, "lora", 2), ("q", 3, "qlora", 4)):
        if method == "qlora":
            pytest.importorskip("bitsandbytes")
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {offset}?", "completion": f" {i * offset}"})
                                + "\n" for i in range(24)), encoding="utf-8")
        spec = RunSpec(model=str(tiny_model_dir), method=method, dataset=DatasetSpec(path=str(data), eval_fraction=0),
                       peft=PeftSettings(r=rank, alpha=2 * rank, target_modules="attention", dropout=0.0),
                       max_steps=3, micro_batch_size=8, seq_len=32, learning_rate=5e-2, precision="fp32",
                       save_steps=100)
        recipe.run(spec, root / name)
        out[name] = root / name / "adapter"
    return out


def _ids(tok):
    return tok(["What is 3 plus 4?", "the model data"], return_tensors="pt", padding=True)


def _logits(model, enc):
    model.eval()
    with torch.no_grad():
        return model(**enc).logits


def _manual(tiny_model_dir, parts: list[tuple[str, float]]):
    """Base weights + sum_i w_i * (alpha_i / r_i) * B_i @ A_i, built from the adapter files alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    params = dict(model.named_parameters())
    for folder, weight in parts:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            with torch.no_grad():
                params[target] += weight * scale * (b @ a)
    return model


def test_generate_returns_text(tiny_model_dir, trained):
    text = adapters.generate(str(tiny_model_dir), [trained["plus"]], "What is 2 plus 1?", max_new_tokens=5)
    assert isinstance(text, str)


def test_switch_adapters_on_one_base(tiny_model_dir, trained):
    model, tok, names = adapters.load_with_adapters(str(tiny_model_dir), [trained["plus"], trained["times"]])
    enc = _ids(tok)
    got = {}
    for name in names:
        model.set_adapter(name)
        got[name] = _logits(model, enc)
    assert not torch.allclose(got[names[0]], got[names[1]], atol=1e-3)
    for name, key in zip(names, ("plus", "times")):
        expected = _logits(_manual(tiny_model_dir, [(trained[key], 1.0)]), enc)
        assert torch.allclose(got[name], expected, atol=TOL)
    each = adapters.generate_each(str(tiny_model_dir), [trained["plus"], trained["times"]], "What is 1 plus 1?",
                                  max_new_tokens=4)
    assert set(each) == {"base", str(trained["plus"]), str(trained["times"])}


def test_combine_cat_is_the_weighted_sum(tiny_model_dir, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = adapters.combine(str(tiny_model_dir), [trained["plus"], trained["times"]], [0.7, 0.3], tmp_path / "mix")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4 + 2  # cat: ranks add up
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    combined = PeftModel.from_pretrained(base, out)
    tok = adapters.load_base(str(tiny_model_dir))[1]
    enc = _ids(tok)
    expected = _logits(_manual(tiny_model_dir, [(trained["plus"], 0.7), (trained["times"], 0.3)]), enc)
    assert torch.allclose(_logits(combined, enc), expected, atol=TOL)


def test_linear_needs_equal_ranks(tiny_model_dir, trained, tmp_path):
    with pytest.raises(RunnerError, match="equal rank"):
        adapters.combine(str(tiny_model_dir), [trained["plus"], trained["times"]], [0.5, 0.5], tmp_path / "x",
                         combination_type="linear")
    with pytest.raises(RunnerError, match="one weight per adapter"):
        adapters.combine(str(tiny_model_dir), [trained["plus"], trained["times"]], [1.0], tmp_path / "y")


@pytest.mark.parametrize("which", ["plus", "q"])
def test_merge_matches_adapter_logits(tiny_model_dir, trained, tmp_path, which):
    from transformers import AutoModelForCausalLM

    out = adapters.merge(str(tiny_model_dir), trained[which], tmp_path / "merged")
    keys = load_file(str(out / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.dtype == torch.float32  # QLoRA adapters merge onto the full-precision base, not the 4-bit one
    tok = adapters.load_base(str(out))[1]
    enc = _ids(tok)
    expected = _logits(_manual(tiny_model_dir, [(trained[which], 1.0)]), enc)
    assert torch.allclose(_logits(merged, enc), expected, atol=TOL)


def test_bad_adapter_folder(tmp_path):
    with pytest.raises(RunnerError, match="adapter_model.safetensors"):
        adapters.check_adapter_dir(tmp_path)


def test_compare_columns_are_labelled(tiny_model_dir, tmp_path):
    """Base vs adapter side by side: prompts whose answers differ, each column checked against its own
    independent source (the plain base model; the merged model), so the labels cannot be swapped."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from runner.train.recipe import generate_batch

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))  # a large update: the answers change
    peft_model.save_pretrained(tmp_path / "loud")
    prompts = ["What is 3 plus 4?", "the model data"]
    res = adapters.generate_compare(str(tiny_model_dir), [tmp_path / "loud"], prompts, max_new_tokens=6)
    assert [c["label"] for c in res["columns"]] == [adapters.BASE_LABEL, "adapter: loud"]
    assert [c["kind"] for c in res["columns"]] == ["base", "adapter"]
    tok = adapters.load_base(str(tiny_model_dir))[1]
    texts = [adapters.chat_prompt(tok, p)[0] for p in prompts]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    merged = adapters.merge(str(tiny_model_dir), tmp_path / "loud", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    want_base = generate_batch(plain, tok, texts, 6, add_special_tokens=False)
    want_tuned = generate_batch(merged, tok, texts, 6, add_special_tokens=False)
    assert want_base != want_tuned  # the prompts' answers differ, so a swap would be caught
    assert [r["outputs"][0] for r in res["rows"]] == want_base
    assert [r["outputs"][1] for r in res["rows"]] == want_tuned
    assert [r["prompt"] for r in res["rows"]] == prompts
    text = adapters.compare_text(res)
    assert text.index("[base (no adapter)]") < text.index("[adapter: loud]")


def test_cli_compare_export_intruders(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ftadvisor.cli import main
    from runner.train.tinymodel import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "z")
    base, ad = str(tiny_model_dir), str(tmp_path / "z")
    assert main(["adapters", "generate", "--base", base, "--adapter", ad, "--compare", "--prompt", "hi",
                 "--prompt", "What is 1 plus 1?", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- [base (no adapter)]") == 2 and out.count("--- [adapter: z]") == 2
    assert main(["adapters", "generate", "--base", base, "--adapter", ad, "--prompt", "a", "--prompt", "b"]) == 2
    assert "--compare" in capsys.readouterr().err
    assert main(["adapters", "export", "--base", base, "--adapter", ad, "--format", "merged",
                 "--output", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "vllm serve" in out and "--enable-lora" in out
    assert main(["adapters", "intruders", "--base", base, "--adapter", ad, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["summary"]["total"] == 0 and rep["summary"]["modules"] == 2  # B = 0: nothing changed
    assert main(["adapters", "intruders", "--base", base, "--adapter", ad, "--epsilon", "2"]) == 2
    assert "epsilon" in capsys.readouterr().err
    gpt2 = build_tiny_model(tmp_path / "gpt2", arch="gpt2")
    g = AutoModelForCausalLM.from_pretrained(gpt2, dtype=torch.float32)
    get_peft_model(g, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"])).save_pretrained(tmp_path / "g")
    assert main(["adapters", "export", "--base", str(gpt2), "--adapter", str(tmp_path / "g"), "--format", "gguf",
                 "--output", str(tmp_path / "gg")]) == 2
    err = capsys.readouterr().err
    assert "LlamaForCausalLM" in err and "GPT2LMHeadModel" in err and "fix:" in err
    assert not (tmp_path / "gg").exists()  # refused before anything was written
