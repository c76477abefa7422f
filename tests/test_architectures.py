"""Architectures off the catalog's happy path, as transformers 5 builds them natively (no remote code).

Each tiny config below is a real architecture the catalog does not hold: hybrid sliding/global attention
(Gemma-3, 5:1), multi-head latent attention with dense layers before MoE layers and shared experts
(DeepSeek-V2 / V3), MoE (Qwen2-MoE with a dense layer, Qwen3-MoE, OLMoE, PhiMoE), fused qkv (Phi-3),
parallel attention + MLP blocks with biases (Falcon, GPT-NeoX). Every one must estimate full, LoRA and
QLoRA by tracing (never a traceback, never the formula), resolve every target preset, and a few are
compared with a real CPU step (saved-tensor measurement of ``test_memory_exact._real_step``).
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from estimator import estimate  # noqa: E402
from estimator.request import EstimateRequest  # noqa: E402

_COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, max_position_embeddings=512)
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)


def _configs():
    import transformers as tf

    return {
        # 7 layers: sliding x5, full, sliding (Gemma-3's 5:1 pattern); a 2-layer prefix has no full layer
        "gemma3_text": lambda: tf.Gemma3TextConfig(intermediate_size=128, num_hidden_layers=7, num_key_value_heads=2,
                                                   head_dim=16, sliding_window=16, **_COMMON),
        # DeepSeek-V2-Lite style: q_proj (no query LoRA), 1 dense layer, then MoE with a shared expert
        "deepseek_v2": lambda: tf.DeepseekV2Config(
            intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
            **_MLA, **_COMMON),
        # DeepSeek-V3 style: query LoRA (q_a_proj / q_b_proj), router bias buffers
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4,
            n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32,
            **_MLA, **_COMMON),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(intermediate_size=128, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=64, num_hidden_layers=3,
                                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                               mlp_only_layers=[1], **_COMMON),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                                               num_key_value_heads=2, head_dim=16, num_experts=8,
                                               num_experts_per_tok=2, **_COMMON),
        "olmoe": lambda: tf.OlmoeConfig(intermediate_size=32, num_hidden_layers=3, num_key_value_heads=4, num_experts=8,
                                        num_experts_per_tok=2, eos_token_id=1, pad_token_id=0, **_COMMON),
        "phimoe": lambda: tf.PhimoeConfig(intermediate_size=64, num_hidden_layers=3, num_key_value_heads=2,
                                          num_local_experts=4, num_experts_per_tok=2, **_COMMON),
        "phi3": lambda: tf.Phi3Config(intermediate_size=128, num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0,
                                      eos_token_id=1, bos_token_id=1, **_COMMON),
        "falcon": lambda: tf.FalconConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                          parallel_attn=True, bias=True, new_decoder_architecture=False,
                                          multi_query=True, max_position_embeddings=512),
        "gpt_neox": lambda: tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, num_attention_heads=4, num_hidden_layers=3,
                                             intermediate_size=128, use_parallel_residual=True, attention_bias=True,
                                             max_position_embeddings=512),
    }


ARCHS = sorted(_configs())


def _config_file(tmp_path, name: str) -> tuple[str, object]:
    cfg = _configs()[name]()
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path), cfg


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_traces_and_every_preset_resolves(tmp_path, arch):
    from estimator.params import build_meta_model, resolve_targets
    from estimator.request import TARGET_PRESETS
    from estimator.slicing import layer_kinds, slice_config, slice_layer_count

    path, cfg = _config_file(tmp_path, arch)
    kinds = layer_kinds(cfg)
    model = build_meta_model(slice_config(cfg, slice_layer_count(kinds)))
    for preset in TARGET_PRESETS:
        assert resolve_targets(model, preset), preset
    for method, targets in (("full", "attention-qv"), ("lora", "attention-qv"), ("qlora", "all-linear")):
        est = estimate(EstimateRequest(model=path, method=method, targets=targets, batch_size=1, seq_len=32))
        assert est.memory.activation_source == "traced", (method, est.notes)
        assert est.memory.activations_bytes > 0 and est.compute.flops_source == "traced"


def test_mla_presets_name_the_query_and_latent_kv_projections(tmp_path):
    from estimator.params import build_meta_model, resolve_targets

    expected = {"deepseek_v2": ["kv_a_proj_with_mqa", "kv_b_proj", "q_proj"],
                "deepseek_v3": ["kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj", "q_b_proj"]}
    for arch, names in expected.items():
        path, cfg = _config_file(tmp_path, arch)
        model = build_meta_model(cfg)
        assert resolve_targets(model, "attention-qv") == names
        assert resolve_targets(model, "attention") == sorted(names + ["o_proj"])
        est = estimate(EstimateRequest(model=path, method="lora", batch_size=1, seq_len=32))
        assert any("latent key/value projections" in n for n in est.notes)


def test_presets_never_target_what_peft_moves_onto_fused_experts(tmp_path):
    """peft 0.21 turns gate_proj / up_proj / down_proj targets of Qwen3-MoE-pattern models into
    target_parameters on the fused experts (ParamWrapper, lora_dropout 0 only): all-linear leaves them out so
    the run gets the Linear adapters the estimate counts. PhiMoE's Linear-subclass router is left out too."""
    from estimator.params import build_meta_model, peft_remapped_names, resolve_targets

    for arch in ("deepseek_v2", "qwen3_moe", "olmoe"):
        _, cfg = _config_file(tmp_path, arch)
        model = build_meta_model(cfg)
        assert {"gate_proj", "up_proj", "down_proj"} <= peft_remapped_names(model)
        assert not set(resolve_targets(model, "all-linear")) & peft_remapped_names(model)
    _, cfg = _config_file(tmp_path, "phimoe")
    assert "router" not in resolve_targets(build_meta_model(cfg), "all-linear")
    # Qwen2-MoE is peft's own base pattern, which it does not remap: its MLP Linears stay targets
    _, cfg = _config_file(tmp_path, "qwen2_moe")
    assert "down_proj" in resolve_targets(build_meta_model(cfg), "all-linear")


@pytest.mark.parametrize("arch,method", [("gemma3_text", "full"), ("gemma3_text", "lora"),
                                         ("deepseek_v2", "full"), ("deepseek_v3", "qlora"),
                                         ("qwen2_moe", "lora")])
def test_slice_replay_equals_the_whole_model_trace(arch, method, tmp_path):
    """The slice (layer 0 + one layer of each other kind) replayed for all layers equals tracing every layer:
    Gemma-3's full-attention layer 5 is in the slice, DeepSeek's dense layer 0 and MoE layers, Qwen2-MoE's
    dense layer 1 among MoE layers."""
    from estimator.slicing import layer_kinds, slice_config
    from estimator.trace import TraceSettings, build_training_model, extrapolate, run_traced_step, trace_slice

    _, cfg = _config_file(tmp_path, arch)
    n = cfg.num_hidden_layers
    st = TraceSettings(method=method, rank=4, alpha=8, dtype="bf16", batch_size=1, seq_len=32, targets="all-linear")
    kinds = layer_kinds(cfg)
    assert kinds is not None and len(set(kinds)) > 1
    sliced = trace_slice(cfg, st)
    whole = run_traced_step(build_training_model(slice_config(cfg, n), st), st)
    a, b = extrapolate(sliced, n, kinds), extrapolate(whole, n, kinds)
    assert a.activations_bytes == b.activations_bytes
    assert a.forward_peak_rel_bytes == b.forward_peak_rel_bytes
    assert a.flops == b.flops
    # gradients at the end of backward: equal up to the 16-byte scalar bookkeeping of autograd (measured)
    assert abs(a.backward_end_rel_bytes - b.backward_end_rel_bytes) <= 64


def test_gemma3_with_a_5_to_1_pattern_estimates_without_a_traceback():
    """The issue's case: Gemma-3's 5 sliding : 1 full layers failed with "layer type 'full_attention' of layer
    5 is not in the traced slice"; a 12-layer Gemma-3 now traces a 3-layer slice (sliding, sliding, full)."""
    import transformers as tf

    from estimator.slicing import layer_kinds, slice_config, slice_layer_count

    cfg = tf.Gemma3TextConfig(intermediate_size=128, num_hidden_layers=12, num_key_value_heads=2, head_dim=16,
                              sliding_window=16, **_COMMON)
    kinds = layer_kinds(cfg)
    assert kinds[5] == "full_attention" and kinds.count("full_attention") == 2
    assert slice_config(cfg, slice_layer_count(kinds)).layer_types == [
        "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("arch,method,dtype", [
    ("gemma3_text", "full", "bf16"), ("gemma3_text", "lora", "bf16"),
    ("deepseek_v2", "full", "fp32"), ("deepseek_v2", "lora", "bf16"),
    ("deepseek_v3", "full", "bf16"), ("phimoe", "lora", "bf16"), ("olmoe", "full", "bf16"),
    ("gpt_neox", "full", "fp32"), ("gpt_neox", "lora", "bf16"), ("falcon", "lora", "bf16"),
])
def test_activations_match_a_real_cpu_step(tmp_path, arch, method, dtype):
    """Within 3% of a real CPU step (measured: at most 1.0%, DeepSeek-V2 LoRA bf16). The real model runs with
    ``use_cache=False`` as the runner loads it (GPT-NeoX saves different tensors with the cache on)."""
    from transformers import AutoModelForCausalLM

    import test_memory_exact

    path, cfg = _config_file(tmp_path, arch)
    batch, seq = 2, 64
    est = estimate(EstimateRequest(model=path, method=method, dtype=dtype, batch_size=batch, seq_len=seq,
                                   attention="sdpa", rank=8, dropout=0.0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if method == "lora" else torch.float32)
    model.config.use_cache = False
    if method == "lora":
        model = test_memory_exact.with_lora(model)
    real = test_memory_exact._real_step(model, "sdpa", dtype, batch=batch, seq=seq)
    test_memory_exact.assert_like_real(est.memory, real, 0.03, weights=method == "full")
