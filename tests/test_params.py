"""Parameter breakdowns and adapter counts: real peft configs on meta models, checked against independent
arithmetic (the LoRA paper's r * (d_in + d_out) per adapted matrix, DoRA's d_out magnitude vector) and against
real ``save_pretrained`` files on tiny models."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from estimator.catalog import resolve_model
from estimator.errors import EstimatorError
from estimator.params import (
    adapter_config,
    build_meta_model,
    count_adapter,
    count_parameters,
    fresh_meta_model,
    linear_names,
    resolve_targets,
    safetensors_file_bytes,
)
from estimator.request import TARGET_PRESETS

# Llama-2-7B: 32 layers, hidden 4096, MLP 11008, vocab 32000, 32 KV heads (its published config.json).
L2_LAYERS, L2_HIDDEN, L2_MLP, L2_VOCAB = 32, 4096, 11008, 32000


def test_lora_r8_on_q_v_of_llama2_7b_is_4194304():
    # LoRA paper arithmetic: 32 layers x 2 matrices (q, v) x r x (4096 + 4096) = 4,194,304 for r = 8.
    count = count_adapter(resolve_model("llama-2-7b"), rank=8, targets="attention-qv")
    assert count.trainable_params == 4_194_304 == L2_LAYERS * 2 * 8 * (L2_HIDDEN + L2_HIDDEN)
    assert count.adapted_modules == 64
    assert count.targets == ["q_proj", "v_proj"]


def test_lora_r16_on_q_v_of_llama2_7b_is_8388608():
    count = count_adapter(resolve_model("llama-2-7b"), rank=16, targets=["q_proj", "v_proj"])
    assert count.trainable_params == 8_388_608


def test_lora_all_linear_llama2_7b_matches_arithmetic():
    # r=16 on q,k,v,o (4096x4096) and gate, up (4096->11008), down (11008->4096): 39,976,960, the figure peft's
    # print_trainable_parameters shows for this setup in countless public notebooks.
    r = 16
    per_layer = 4 * r * (L2_HIDDEN + L2_HIDDEN) + 3 * r * (L2_HIDDEN + L2_MLP)
    count = count_adapter(resolve_model("llama-2-7b"), rank=r, targets="all-linear")
    assert count.trainable_params == L2_LAYERS * per_layer == 39_976_960


def test_dora_adds_d_out_per_adapted_linear():
    # DoRA (Liu et al. 2024) adds a magnitude vector of d_out per adapted Linear. Llama-3.1-8B has GQA:
    # q_proj 4096 -> 4096, v_proj 4096 -> 1024 (8 KV heads x 128).
    entry = resolve_model("llama-3.1-8b")
    lora = count_adapter(entry, rank=8, targets="attention-qv")
    dora = count_adapter(entry, rank=8, targets="attention-qv", dora=True)
    assert lora.trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert dora.trainable_params - lora.trainable_params == 32 * (4096 + 1024)
    assert dora.method == "dora"


def test_rslora_changes_scaling_not_count():
    entry = resolve_model("mistral-7b")
    assert (count_adapter(entry, rank=8, rslora=True).trainable_params
            == count_adapter(entry, rank=8).trainable_params)


def test_adalora_count_is_svd_form():
    # AdaLoRA (Zhang et al. 2023): P (r x d_in), Q (d_out x r) and the r singular values per adapted matrix,
    # starting at init_r = rank. GPT-2's fused c_attn is 768 -> 2304.
    count = count_adapter(resolve_model("gpt2"), rank=8, adalora=True, total_steps=100)
    assert count.trainable_params == 12 * (8 * 768 + 2304 * 8 + 8)


def test_gemma2_lora_uses_explicit_head_dim():
    # Gemma-2-2B: hidden 2304 but head_dim 256 x 8 query heads = 2048 and 4 KV heads = 1024 (not hidden/heads).
    count = count_adapter(resolve_model("gemma-2-2b"), rank=4, targets="attention-qv")
    assert count.trainable_params == 26 * 4 * ((2304 + 2048) + (2304 + 1024))


def test_phi3_presets_use_fused_projections():
    model = build_meta_model(resolve_model("phi-3-mini-4k"))
    assert resolve_targets(model, "attention-qv") == ["qkv_proj"]
    assert resolve_targets(model, "attention") == ["o_proj", "qkv_proj"]
    assert resolve_targets(model, "all-linear") == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]


def test_gpt2_presets_handle_conv1d_and_shared_c_proj():
    model = build_meta_model(resolve_model("gpt2"))
    assert resolve_targets(model, "attention-qv") == ["c_attn"]
    # c_proj exists in attn and mlp: the attention preset must only take attention's.
    assert resolve_targets(model, "attention") == ["attn.c_proj", "c_attn"]
    assert resolve_targets(model, "all-linear") == ["c_attn", "c_fc", "c_proj"]
    count = count_adapter(resolve_model("gpt2"), rank=8, targets="attention")
    assert count.trainable_params == 12 * 8 * ((768 + 2304) + (768 + 768))
    cfg = adapter_config(fresh_meta_model(resolve_model("gpt2")), rank=8, targets="attention")
    assert cfg.fan_in_fan_out  # Conv1D stores weights transposed


@pytest.mark.parametrize("model_id", ["llama-2-7b", "qwen2.5-0.5b", "mixtral-8x7b", "gemma-2-2b", "tinyllama-1.1b"])
def test_presets_resolve_on_catalog_models(model_id):
    model = build_meta_model(resolve_model(model_id))
    qv, attention, all_linear, with_experts = (resolve_targets(model, p) for p in TARGET_PRESETS)
    assert with_experts == all_linear  # the module targets; the experts go in target_parameters
    assert qv == ["q_proj", "v_proj"]
    assert set(qv) <= set(attention) <= set(all_linear)
    assert "lm_head" not in all_linear


def test_unknown_target_lists_the_models_linear_names():
    model = build_meta_model(resolve_model("llama-2-7b"))
    with pytest.raises(EstimatorError) as err:
        resolve_targets(model, ["q_proj", "query"])
    assert "'query'" in str(err.value) and "gate_proj" in str(err.value)
    assert err.value.field == "targets"
    assert resolve_targets(model, "q_proj,k_proj") == ["k_proj", "q_proj"]
    assert "lm_head" not in linear_names(model)


@pytest.mark.parametrize("knobs,field", [
    (dict(rank=0), "rank"),
    (dict(rank=5000), "rank"),
    (dict(rank=8, alpha=-1.0), "alpha"),
    (dict(rank=8, adalora=True), "total_steps"),
    (dict(rank=8, adalora=True, dora=True, total_steps=10), "dora"),
    (dict(rank=8, method="full"), "method"),
    (dict(rank=8, targets=[]), "targets"),
])
def test_bad_adapter_knobs_name_the_field(knobs, field):
    with pytest.raises(EstimatorError) as err:
        count_adapter(resolve_model("smollm2-135m"), **knobs)
    assert err.value.field == field
    assert field in str(err.value)


# ------------------------------------------------------------------------------------------- breakdowns


def test_breakdown_parts_sum_to_total_for_every_catalog_model():
    from estimator.catalog import list_models

    for entry in list_models():
        b = count_parameters(build_meta_model(entry))
        assert b.embeddings + b.attention + b.mlp + b.norms + b.head + b.other == b.total, entry.id
        assert b.other == 0, entry.id


def test_untied_llama2_breakdown_by_part():
    b = count_parameters(build_meta_model(resolve_model("llama-2-7b")))
    assert b.embeddings == b.head == L2_VOCAB * L2_HIDDEN
    assert b.attention == L2_LAYERS * 4 * L2_HIDDEN * L2_HIDDEN
    assert b.mlp == L2_LAYERS * 3 * L2_HIDDEN * L2_MLP
    assert b.norms == (2 * L2_LAYERS + 1) * L2_HIDDEN
    assert b.active == b.total


def test_tied_embeddings_count_once():
    # Qwen2.5-0.5B ties lm_head to embed_tokens: 151,936 x 896 counted once, head 0.
    b = count_parameters(build_meta_model(resolve_model("qwen2.5-0.5b")))
    assert b.head == 0 and b.embeddings == 151_936 * 896
    assert b.total == 494_032_768


def test_mixtral_active_parameters_use_two_of_eight_experts():
    # Each expert: gate, up (4096 -> 14336) and down (14336 -> 4096); 6 of 8 idle per token in 32 layers.
    b = count_parameters(build_meta_model(resolve_model("mixtral-8x7b")))
    expert = 3 * 4096 * 14336
    assert b.experts == 32 * 8 * expert
    assert b.active == b.total - 32 * 6 * expert
    assert round(b.active / 1e9, 1) == 12.9  # Mistral AI's announcement: 12.9B active parameters per token


# ----------------------------------------------------------------------------------------------- caching


def test_meta_model_is_cached_and_peft_does_not_touch_it():
    entry = resolve_model("smollm2-135m")
    shared = build_meta_model(entry)
    assert build_meta_model(entry) is shared
    assert all(p.device.type == "meta" for p in shared.parameters())
    count_adapter(entry, rank=4, targets="all-linear", dora=True)
    assert not any("lora" in name for name, _ in shared.named_parameters())
    assert fresh_meta_model(entry) is not shared


# ------------------------------------------------------------------------------------- real adapter files

TINY_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300},
    "gpt2": {"model_type": "gpt2", "n_embd": 48, "n_layer": 2, "n_head": 4, "vocab_size": 300, "n_positions": 64,
             "bos_token_id": 0, "eos_token_id": 0},
    "phi3": {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "pad_token_id": 0,
             "eos_token_id": 0, "bos_token_id": 0},
}
KNOBS = [
    dict(rank=8),
    dict(rank=4, dora=True),
    dict(rank=16, rslora=True, targets="all-linear"),
    dict(rank=6, adalora=True, total_steps=10, targets="attention"),
]


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("knobs", KNOBS, ids=["lora", "dora", "rslora-all", "adalora"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_adapter_bytes_equal_a_real_save(tmp_path, arch, knobs, dtype):
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = TINY_CONFIGS[arch]
    estimate = count_adapter(cfg, adapter_dtype=dtype, **knobs)
    torch.manual_seed(0)
    config = dict(cfg)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, adapter_config(model, **knobs))
    if dtype == "bf16":
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peft_model.save_pretrained(tmp_path)
    assert estimate.trainable_params == trainable
    assert estimate.adapter_bytes == os.path.getsize(tmp_path / "adapter_model.safetensors")


def test_safetensors_size_matches_the_library():
    from safetensors.torch import save_file

    shapes = {"b.weight": (3, 5), "a.bias": (7,), "z.lora_A.weight": (16, 1000), "m": (1,)}
    for dtype, torch_dtype in (("fp32", torch.float32), ("fp16", torch.float16)):
        path = f"{os.environ['FTADVISOR_HOME']}/t-{dtype}.safetensors"
        save_file({k: torch.zeros(v, dtype=torch_dtype) for k, v in shapes.items()}, path, metadata={"format": "pt"})
        assert safetensors_file_bytes(shapes, dtype, metadata={"format": "pt"}) == os.path.getsize(path)


@pytest.mark.parametrize("model_id", ["llama-2-7b", "gpt2", "phi-3-mini-4k", "gemma-2-2b", "mixtral-8x7b"])
@pytest.mark.parametrize("knobs", [dict(rank=8), dict(rank=4, dora=True, targets="all-linear"),
                                   dict(rank=6, adalora=True, total_steps=10, targets="attention")],
                         ids=["lora-qv", "dora-all", "adalora-attn"])
def test_two_layer_slice_counts_equal_peft_on_the_whole_model(monkeypatch, model_id, knobs):
    """count_adapter applies peft to a 2-layer slice and repeats layer 0; peft on every layer gives the same."""
    import estimator.params as params

    entry = resolve_model(model_id)
    sliced = count_adapter(entry, **knobs)
    monkeypatch.setattr(params, "SLICE_LAYERS", 10**6)  # never slice: peft on the whole meta model
    params._count_adapter_cached.cache_clear()
    try:
        whole = count_adapter(entry, **knobs)
    finally:
        params._count_adapter_cached.cache_clear()
    assert sliced == whole
