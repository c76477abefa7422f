"""GGUF export read back by transformers' own GGUF reader: logits match the merged model within f16 rounding
(tiny Llama with an untied head and tiny Qwen2 with tied embeddings and q/k/v biases), tokenizer and chat template
survive, q8_0 stays close, an unsupported architecture is refused by name; Ollama Modelfile and vLLM line."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json

import pytest
import torch

pytest.importorskip("gguf")

from runner.tools import adapters, gguf_export  # noqa: E402
from runner.errors import RunnerError  # noqa: E402

#: f16 stores 11 significant bits (relative step 2**-11 ~ 4.9e-4 per weight); through two tiny layers the logits
#: (|logit| < 2) move by 3e-4 (base) to 4e-3 (with a large random adapter), measured. A wrong RoPE row order
#: moves them by more than 5e-2.
F16_ATOL = 1e-2
#: The same weights in fp32, summed in another order (the reference below rounds every 2-D weight to f16).
EXACT_ATOL = 1e-4
#: q8_0: 8-bit values with one f16 scale per 32 (relative step ~ 1/127 per weight): measured ~9e-3.
Q8_ATOL = 5e-2
TEXT = "What is 3 plus 4? the model data <|im_start|>user"


def _adapter(model_dir, out, seed=0, scale=0.5):
    """A LoRA adapter on every attention and MLP Linear with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    return out


def _f16_rounded(model):
    """A copy of ``model`` whose matrices are rounded to float16 and back (what an f16 GGUF stores)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return out


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_qwen_dir"])
def test_gguf_logits_match_merged(request, tmp_path, which):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = request.getfixturevalue(which)
    adapter = _adapter(model_dir, tmp_path / "ad")
    res = adapters.export(str(model_dir), adapter, "gguf", tmp_path / "out", gguf_type="f16")
    gguf_file = tmp_path / "out" / "out.gguf"
    assert set(res["files"]) == {"out.gguf", "Modelfile"}
    merged, tok, _ = adapters.merged_model(str(model_dir), adapter)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    # the independent reader: transformers builds the model from the GGUF alone (config, weights, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert type(loaded).__name__ == type(merged).__name__
    assert loaded.config.tie_word_embeddings == merged.config.tie_word_embeddings
    rounded = _f16_rounded(merged)
    with torch.no_grad():
        a, b, r = merged(input_ids=ids).logits, loaded(input_ids=ids).logits, rounded(input_ids=ids).logits
    # exact up to fp32 summation order: the GGUF holds the merged weights rounded to f16, nothing else
    assert (r - b).abs().max() < EXACT_ATOL
    # and so it is within f16 rounding of the fp32 merged model
    assert (a - b).abs().max() < F16_ATOL
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    # the adapter really changed the model: the GGUF is not the base in disguise
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert (base(input_ids=ids).logits - b).abs().max() > 10 * F16_ATOL
    read_tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    assert read_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    assert read_tok.chat_template == tok.chat_template
    assert read_tok.eos_token == tok.eos_token


def test_q8_0_is_smaller_and_close(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = adapters.load_base(str(tiny_model_dir))[1]
    f16 = gguf_export.write_gguf(model, tok, tmp_path / "a" / "m.gguf", "f16")
    q8 = gguf_export.write_gguf(model, tok, tmp_path / "b" / "m.gguf", "q8_0")
    assert q8.stat().st_size < 0.7 * f16.stat().st_size  # 34 bytes per 32 weights vs 64
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    err = gguf_export.gguf_roundtrip_error(model, q8, ids)
    assert err["max_abs_diff"] < Q8_ATOL and err["argmax_agreement"] > 0.9


def test_rope_permutation_is_needed(tiny_model_dir, tmp_path, monkeypatch):
    """Without the q/k row permutation the read-back model differs from the f16 weights: the exact check above
    would catch a wrong RoPE layout."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = adapters.load_base(str(tiny_model_dir))[1]
    monkeypatch.setattr(gguf_export, "_permute_rope", lambda w, n: w)
    f = gguf_export.write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    err = gguf_export.gguf_roundtrip_error(_f16_rounded(model), f, tok(TEXT, return_tensors="pt")["input_ids"])
    assert err["max_abs_diff"] > 10 * EXACT_ATOL  # measured ~6e-3 on this random tiny model


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import AutoModelForCausalLM

    from runner.train.tinymodel import build_tiny_model

    folder = build_tiny_model(tmp_path / "gpt2", arch="gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = adapters.load_base(str(folder))[1]
    with pytest.raises(RunnerError) as err:
        gguf_export.write_gguf(model, tok, tmp_path / "x.gguf")
    assert "GPT2LMHeadModel" in str(err.value) and "LlamaForCausalLM" in str(err.value)
    assert "Qwen2ForCausalLM" in str(err.value) and "merged" in err.value.fix
    assert not (tmp_path / "x.gguf").exists()


def test_merged_export_and_serving_lines(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    adapter = _adapter(tiny_model_dir, tmp_path / "ad", scale=0.2)
    res = adapters.export(str(tiny_model_dir), adapter, "merged", tmp_path / "m")
    out = tmp_path / "m"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(res["files"])
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    has_template = "chat_template" in tok_cfg or (out / "chat_template.jinja").is_file()
    assert has_template
    GenerationConfig.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref, tok, _ = adapters.merged_model(str(tiny_model_dir), adapter)
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    assert res["vllm_lora"]["command"].startswith("vllm serve ")
    assert "--enable-lora --lora-modules ad=" in res["vllm_lora"]["command"]
    assert res["serve"] == f"vllm serve {out.resolve()}"


def test_modelfile_chatml(tiny_model_dir):
    text = gguf_export.ollama_modelfile("m.gguf", "{{ '<|im_start|>' }}", "<|im_end|>")
    assert text.splitlines()[1] == "FROM ./m.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and "TEMPLATE" in text and "SYSTEM" not in text
    # a template that inserts a default system message (as SmolLM2's does) carries it over as SYSTEM
    tok = adapters.load_base(str(tiny_model_dir))[1]
    assert gguf_export.default_system_prompt(tok) is None  # the tiny ChatML template inserts none
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}"
                         "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                         "'<|im_end|>\\n' }}{% endfor %}")
    assert gguf_export.default_system_prompt(tok) == "Be brief."
    assert 'SYSTEM """Be brief."""' in gguf_export.ollama_modelfile("m.gguf", tok.chat_template, "<|im_end|>",
                                                                   "Be brief.")


def test_bad_format(tiny_model_dir, tmp_path):
    adapter = _adapter(tiny_model_dir, tmp_path / "ad")
    with pytest.raises(RunnerError, match="format must be one of merged, gguf"):
        adapters.export(str(tiny_model_dir), adapter, "onnx", tmp_path / "o")
    with pytest.raises(RunnerError, match="gguf type"):
        adapters.export(str(tiny_model_dir), adapter, "gguf", tmp_path / "o", gguf_type="q4_k")


def _sentencepiece_style_tokenizer(folder):
    """A Llama-2-style tokenizer: BPE over "▁"-joined text with byte fallback (<0xNN> tokens), <s> added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, LlamaTokenizerFast

    from runner.train.tinymodel import CHATML_TEMPLATE, _corpus

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                   show_progress=False))
    fast = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.train.tinymodel import tiny_config

    tok = _sentencepiece_style_tokenizer(tmp_path / "tok")
    cfg = tiny_config("llama", vocab_size=len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    f = gguf_export.write_gguf(model, tok, tmp_path / "sp" / "m.gguf")
    back = AutoTokenizer.from_pretrained(f.parent, gguf_file=f.name)
    for text in ("What is 12 plus 7?", "the model data é", " two  spaces"):  # é needs the byte fallback
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    ids = tok("What is 3 plus 4?", return_tensors="pt")["input_ids"]
    err = gguf_export.gguf_roundtrip_error(_f16_rounded(model), f, ids)
    assert err["max_abs_diff"] < EXACT_ATOL
