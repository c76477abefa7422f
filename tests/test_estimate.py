"""estimate(): counts against independent sources, exact extrapolation of the trace, multi-GPU, what fits.

Sources of expected numbers are named in each test: published parameter counts (REFERENCE.md), the real peft
on the full meta model (``params.count_adapter``), a trace of the full-depth model (for extrapolation), and
the published memory figures of the QLoRA and ZeRO papers.
"""

from __future__ import annotations

import json
import math
import time
import warnings

import pytest

torch = pytest.importorskip("torch")

from estimator import EstimateRequest, EstimatorError, estimate  # noqa: E402
from estimator import fitting_gpus, max_batch_size, max_seq_len, min_gpus, storage_for_tasks  # noqa: E402
from estimator.inventory import build_inventory, param_breakdown  # noqa: E402

GIB = 1024**3


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """A 4-layer tiny Llama config.json (traces in well under a second)."""
    from runner.train.tinymodel import tiny_config

    cfg = tiny_config("llama", vocab_size=512, hidden_size=64, layers=4)
    cfg.max_position_embeddings = 4096
    path = tmp_path_factory.mktemp("tiny-cfg") / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


# ------------------------------------------------------------------------------------------ parameters


def test_adalora_counts_and_file_size_match_peft():
    from estimator.catalog import resolve_model
    from estimator.params import count_adapter

    est = estimate(EstimateRequest(model="smollm2-135m", method="lora", adalora=True, rank=12, seq_len=64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = count_adapter(resolve_model("smollm2-135m"), method="lora", adalora=True, rank=12, total_steps=100)
    assert est.model.trainable_params == real.trainable_params
    assert est.adapter_bytes == real.adapter_bytes


def test_lora_counts_match_published_llama2_7b():
    # REFERENCE.md / LoRA practice: Llama-2-7B total 6,738,415,616; LoRA on q,v: r=8 4,194,304, r=16 8,388,608
    e8 = estimate(EstimateRequest(model="llama-2-7b", method="lora", rank=8, targets="attention-qv"))
    assert e8.model.total_params == 6_738_415_616
    assert e8.model.trainable_params == 4_194_304
    e16 = estimate(EstimateRequest(model="llama-2-7b", method="lora", rank=16, targets="attention-qv"))
    assert e16.model.trainable_params == 8_388_608


@pytest.mark.parametrize("model_id", ["smollm2-135m", "gpt2", "gemma-2-2b", "qwen2.5-0.5b"])
def test_inventory_from_slice_equals_full_meta_model(model_id):
    """The slice-replicated inventory equals the full meta model and the real peft adapter on it."""
    from estimator.catalog import resolve_model
    from estimator.params import build_meta_model, count_adapter, count_parameters

    entry = resolve_model(model_id)
    req = EstimateRequest(model=model_id, method="lora", rank=8, targets="all-linear", dora=True)
    inv, model, _ = build_inventory(entry, req)
    full = count_parameters(build_meta_model(entry))
    assert param_breakdown(model, entry.hf_config(), inv.num_layers) == full
    assert sum(t.numel for t in inv.tensors if ".lora_" not in t.name) == full.total
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = count_adapter(entry, method="lora", rank=8, targets="all-linear", dora=True)
    assert inv.trainable_params == real.trainable_params
    est = estimate(req)
    assert est.adapter_bytes == real.adapter_bytes  # same safetensors file size as peft's saved adapter


# ------------------------------------------------------------------------------------------ traces


@pytest.mark.parametrize("grad_ckpt", [False, True])
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_extrapolation_equals_full_depth_trace(method, grad_ckpt):
    """pre + layer0 + (L-1) x layer1 + post from a 2-layer slice == the trace of the whole 5-layer model."""
    from transformers import LlamaConfig

    from estimator.slicing import slice_config
    from estimator.trace import TraceSettings, build_training_model, extrapolate, run_traced_step, trace_slice

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=5,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    st = TraceSettings(method=method, rank=4, alpha=8, dtype="bf16", batch_size=2, seq_len=64,
                       attention="sdpa", grad_checkpointing=grad_ckpt)
    ex = extrapolate(trace_slice(cfg, st), 5, None)
    whole = run_traced_step(build_training_model(slice_config(cfg, 5), st), st)
    assert ex == extrapolate(whole, 5, None)


def test_alternating_layer_types_use_a_three_layer_slice():
    """Gemma-2 alternates sliding/full attention: a 3-layer slice, exact against the 6-layer trace."""
    from transformers import Gemma2Config

    from estimator.slicing import slice_config
    from estimator.trace import TraceSettings, build_training_model, extrapolate, run_traced_step, trace_slice

    cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                       max_position_embeddings=512)
    st = TraceSettings(method="lora", rank=4, alpha=8, dtype="bf16", batch_size=1, seq_len=64, attention="eager")
    trace = trace_slice(cfg, st)
    assert trace.slice_layers == 3
    types = list(cfg.layer_types)
    whole = run_traced_step(build_training_model(slice_config(cfg, 6), st), st)
    assert extrapolate(trace, 6, types) == extrapolate(whole, 6, types)


def test_trace_failure_falls_back_to_formula_and_says_so(tiny_cfg, monkeypatch):
    from estimator import engine
    from estimator import trace as trace_mod
    from estimator.errors import TraceError

    def boom(*a, **k):
        raise TraceError("NotImplementedError: unsupported op (test)")

    monkeypatch.setattr(trace_mod, "trace_slice", boom)
    engine.clear_caches()
    est = estimate(EstimateRequest(model=tiny_cfg, method="lora", batch_size=3, seq_len=96))
    engine.clear_caches()
    assert est.memory.activation_source == "formula"
    assert any("formula" in n and "trace failed" in n for n in est.notes)
    assert est.memory.activations_bytes > 0


# ---------------------------------------------------------------------------------------- regimes


def test_full_finetuning_is_18_bytes_per_parameter_plus_activations():
    """Mixed-precision AdamW = 18 B/param (REFERENCE.md: 4 master + 2 bf16 copy + 4 grad + 8 moments).

    The runner keeps fp32 master weights and autocasts: weights + grads + states are 16 B/param and the
    bf16 weight copies that backward needs show up in the traced activations (tiny batch so they dominate).
    """
    est = estimate(EstimateRequest(model="smollm2-135m", method="full", dtype="bf16", batch_size=1, seq_len=8))
    p = est.model.total_params
    m = est.memory
    assert m.weights_bytes - 4 * p < 1024  # fp32 weights + the rotary buffer
    assert m.gradients_bytes == 4 * p and m.optimizer_bytes == 8 * p
    per_param = (m.weights_bytes + m.gradients_bytes + m.optimizer_bytes + m.activations_bytes) / p
    assert 17.5 < per_param < 18.5, per_param


def test_qlora_65b_class_fits_under_48_gb():
    """QLoRA paper: fine-tuning a 65B model in < 48 GB (NF4, double quant, paged optimizers, checkpointing)."""
    est = estimate(EstimateRequest(model="llama-2-70b", method="qlora", rank=64, targets="all-linear",
                                   optimizer="paged-adamw-8bit", grad_checkpointing=True, batch_size=1,
                                   seq_len=512, gpu="a100-80gb"))
    # the paper's figure is the tensors a 48 GB card must hold: our allocated peak (max_memory_allocated);
    # Llama-2-70B has 6% more parameters than LLaMA-65B, so the card's device peak lands just above 48 GB
    assert est.memory.allocated_peak_bytes < 48e9, est.memory.allocated_peak_bytes / 1e9
    assert est.fits


def test_zero_strategies_shrink_per_gpu_memory_as_deepspeed_says():
    """ZeRO-2 per GPU = 2P + 18P/N (DeepSpeed); ZeRO-3 also shards the weights."""
    base = dict(model="qwen2.5-0.5b", method="full", batch_size=1, seq_len=256, gpu="a100-80gb", num_gpus=8)
    z2 = estimate(EstimateRequest(sharding="zero2", **base))
    z3 = estimate(EstimateRequest(sharding="zero3", **base))
    ddp = estimate(EstimateRequest(sharding="ddp", **base))
    p = z2.model.total_params
    # DeepSpeed's 18 counts the fp32 gradient partition, which exists only at the step: half of the step
    # temporaries (the other half is AdamW's sqrt, which DeepSpeed's estimator leaves out)
    static_z2 = (z2.memory.weights_bytes + z2.memory.gradients_bytes + z2.memory.optimizer_bytes
                 + z2.memory.optimizer_temp_bytes // 2)
    assert abs(static_z2 - (2 * p + 18 * p / 8)) < 64 * 1024  # buffers, rounding, the no-decay group only
    assert z3.memory.weights_bytes < z2.memory.weights_bytes / 7
    assert z3.memory.peak_bytes < z2.memory.peak_bytes < ddp.memory.peak_bytes


def test_gradient_accumulation_keeps_gradients_through_the_forward():
    one = estimate(EstimateRequest(model="smollm2-135m", method="full", seq_len=256))
    four = estimate(EstimateRequest(model="smollm2-135m", method="full", seq_len=256, grad_accum_steps=4))
    fwd = "forward/loss end"
    assert (four.memory.allocated_phase_peaks[fwd] - one.memory.allocated_phase_peaks[fwd]
            == one.memory.gradients_bytes)


def test_offload_moves_states_to_cpu():
    base = dict(model="qwen2.5-0.5b", method="full", batch_size=1, seq_len=256, num_gpus=4, sharding="zero3")
    on = estimate(EstimateRequest(offload=True, **base))
    off = estimate(EstimateRequest(**base))
    assert on.memory.optimizer_bytes == 0 and on.memory.offloaded_bytes > 0
    assert on.memory.peak_bytes < off.memory.peak_bytes


def test_optimizers_state_bytes(tiny_cfg):
    p_adam = estimate(EstimateRequest(model=tiny_cfg, method="full", optimizer="adamw", seq_len=32))
    p_sgd = estimate(EstimateRequest(model=tiny_cfg, method="full", optimizer="sgd", seq_len=32))
    p_8 = estimate(EstimateRequest(model=tiny_cfg, method="full", optimizer="adamw-8bit", seq_len=32))
    p_af = estimate(EstimateRequest(model=tiny_cfg, method="full", optimizer="adafactor", seq_len=32))
    n = p_adam.model.trainable_params
    assert p_adam.memory.optimizer_bytes == 8 * n
    assert p_sgd.memory.optimizer_bytes == 0  # Trainer's "sgd": momentum 0, no state
    assert 2 * n < p_8.memory.optimizer_bytes < 3 * n
    assert p_af.memory.optimizer_bytes < p_8.memory.optimizer_bytes


# --------------------------------------------------------------------------------------- what fits


def test_cached_estimate_is_fast(tiny_cfg):
    req = EstimateRequest(model=tiny_cfg, method="lora", seq_len=64)
    estimate(req)
    start = time.perf_counter()
    again = estimate(EstimateRequest(model=tiny_cfg, method="lora", seq_len=64))
    assert time.perf_counter() - start < 0.05
    assert again.memory.peak_bytes == estimate(req).memory.peak_bytes


def test_min_gpus_and_fitting_gpus():
    req = EstimateRequest(model="llama-2-13b", method="full", batch_size=1, seq_len=512, gpu="a100-80gb")
    assert not estimate(req).fits
    n = min_gpus(req)
    assert n is not None and n > 1
    best = [estimate(EstimateRequest(**{**req.model_dump(), "num_gpus": n, "sharding": s})) for s in ("zero3", "fsdp")]
    assert any(e.fits for e in best)
    fewer = [estimate(EstimateRequest(**{**req.model_dump(), "num_gpus": n - 1, "sharding": s}))
             for s in ("zero3", "fsdp")]
    assert not any(e.fits for e in fewer)
    rows = fitting_gpus(EstimateRequest(model="smollm2-135m", method="lora", seq_len=256))
    assert len(rows) >= 13 and all(e.fits == (e.memory.peak_bytes + e.memory.headroom_bytes <= e.gpu.usable_bytes)
                                      for _, e in rows)


def test_max_batch_size(tiny_cfg):
    req = EstimateRequest(model=tiny_cfg, method="lora", seq_len=256, gpu="t4", dtype="fp16")
    b = max_batch_size(req)
    assert b >= 1
    assert estimate(EstimateRequest(**{**req.model_dump(), "batch_size": b})).fits
    if b < 4096:
        assert not estimate(EstimateRequest(**{**req.model_dump(), "batch_size": b + 1})).fits


@pytest.mark.slow  # about 7 traces (20 s on 2 shared cores)
def test_max_seq_len(tiny_cfg):
    # eager attention at batch 64: the s^2 attention scores make the length the limit below the 4096 context
    long = dict(model=tiny_cfg, method="full", batch_size=64, gpu="t4", dtype="fp16", attention="eager")
    s = max_seq_len(EstimateRequest(**long))
    assert s % 64 == 0 and 0 < s < 4096
    assert estimate(EstimateRequest(seq_len=s, **long)).fits
    assert not estimate(EstimateRequest(seq_len=s + 64, **long)).fits


def test_storage_for_tasks():
    est = estimate(EstimateRequest(model="llama-2-7b", method="lora", rank=8))
    out = storage_for_tasks(est, 10)
    assert out["full_checkpoints_bytes"] == 10 * est.checkpoint_bytes
    assert out["base_plus_adapters_bytes"] == est.storage.base_bytes + 10 * est.adapter_bytes
    assert out["ratio"] > 5
    with pytest.raises(EstimatorError):
        storage_for_tasks(est, 0)


def test_time_and_cost_follow_tokens():
    req = EstimateRequest(model="llama-2-7b", method="lora", examples=10_000, tokens_per_example=512, epochs=2,
                          gpu="a100-80gb", mfu=0.4, price=2.0)
    est = estimate(req)
    c = est.compute
    assert c.tokens == 10_240_000
    # traced FLOPs are within 15% of the 4PD rule for LoRA (REFERENCE.md) at this short length
    assert 0.85 < c.flops_per_token / (4 * est.model.total_params) < 1.3
    assert c.hours == pytest.approx(c.flops / (312e12 * 0.4) / 3600, rel=1e-3)
    assert c.cost_usd == pytest.approx(c.gpu_hours * 2.0)


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes,field", [
    ({"gpu": "h900"}, "gpu"), ({"model": "no-such-model"}, "model"), ({"seq_len": 100_000}, "seq_len"),
    ({"targets": ["nope_proj"]}, "targets"), ({"gpu": "t4", "dtype": "bf16"}, "dtype"),
])
def test_bad_input_names_the_field(changes, field):
    with pytest.raises(EstimatorError) as info:
        estimate(EstimateRequest(**{"model": "smollm2-135m", "method": "lora", **changes}))
    assert info.value.field == field


@pytest.mark.parametrize("config", [
    {"model_type": "llama"},  # truncated: no sizes
    {"model_type": "llama", "hidden_size": -4, "num_hidden_layers": 2, "num_attention_heads": 4,
     "intermediate_size": 8, "vocab_size": 10},
    {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 10**12, "num_attention_heads": 4,
     "intermediate_size": 128, "vocab_size": 100},
])
def test_malformed_config_is_a_clear_error(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(EstimatorError):
        estimate(EstimateRequest(model=str(path), method="lora"))


def test_card_memory_allocated_reserved_device_and_margin():
    """What the card holds: allocated (tensors + cuBLAS workspaces) -> reserved (caching allocator model) ->
    device (+ CUDA context); fits on the device peak + the named headroom against the nvidia-smi total."""
    from estimator.memory import (ALLOCATOR_RESERVED_SHORTFALL, CUBLAS_WORKSPACE_BYTES_OLDER,
                                  CUBLAS_WORKSPACE_BYTES_SM90, CUDA_CONTEXT_BYTES, FIT_HEADROOM_FRACTION)

    kw = dict(model="qwen2.5-0.5b", method="lora", batch_size=2, seq_len=256)
    a100 = estimate(EstimateRequest(gpu="a100-80gb", **kw)).memory
    h100 = estimate(EstimateRequest(gpu="h100-80gb", **kw)).memory
    # cuBLAS workspaces (PyTorch CublasHandlePool.cpp defaults): 2 handles x 32 MiB on Hopper, 8.125 MiB before
    assert h100.allocated_peak_bytes - a100.allocated_peak_bytes == 2 * (CUBLAS_WORKSPACE_BYTES_SM90
                                                                         - CUBLAS_WORKSPACE_BYTES_OLDER)
    m = a100
    assert m.reserved_peak_bytes == math.ceil(m.allocated_peak_bytes / (1 - ALLOCATOR_RESERVED_SHORTFALL))
    assert m.peak_bytes == m.reserved_peak_bytes + CUDA_CONTEXT_BYTES and m.nccl_bytes == 0
    assert m.usable_bytes == 81920 * 1024**2  # A100-SXM4-80GB: nvidia-smi 81920MiB
    assert m.headroom_bytes == int(FIT_HEADROOM_FRACTION * m.usable_bytes)
    assert m.margin_bytes == m.usable_bytes - m.headroom_bytes - m.peak_bytes
    # the A10 (24 GB datasheet) lets a process fill 23028 MiB: fits is judged on that
    a10 = estimate(EstimateRequest(gpu="a10g", **kw))
    assert a10.gpu.usable_bytes == 23028 * 1024**2 < a10.gpu.memory_bytes
    ddp = estimate(EstimateRequest(gpu="a100-80gb", num_gpus=2, **kw)).memory
    assert ddp.nccl_bytes > 0 and ddp.peak_bytes == ddp.reserved_peak_bytes + CUDA_CONTEXT_BYTES + ddp.nccl_bytes


def test_issue_case_pure_bf16_full_fits_one_a100_80gb():
    """Issue 10: Mistral-7B full fine-tuning at 4 x 4096 with checkpointing on one A100-80GB. Mixed precision
    (fp32 master weights) needs ~135 GiB allocated; pure bf16 ~67.5 GiB, within 1% of the 67.96 GiB
    max_memory_allocated fms-acceleration measured (data/validation/published_gpu_memory.csv, fms-full-bs4),
    and it fits with a positive margin once allocator, context and headroom are added."""
    kw = dict(model="mistral-7b", method="full", batch_size=4, seq_len=4096, grad_checkpointing=True,
              gpu="a100-80gb")
    mixed = estimate(EstimateRequest(**kw))
    pure = estimate(EstimateRequest(master_dtype="bf16", **kw))
    measured = 72_971_724_288
    assert abs(pure.memory.allocated_peak_bytes / measured - 1) < 0.02
    assert pure.fits and pure.memory.margin_bytes > 0
    assert not mixed.fits and mixed.memory.allocated_peak_bytes > 1.9 * pure.memory.allocated_peak_bytes
    assert pure.checkpoint_bytes == mixed.checkpoint_bytes // 2  # saved as trained: bf16
    assert any("pure bf16" in n for n in pure.notes)


def test_kv_cache_matches_transformers_dynamic_cache():
    """The generation KV cache counted for the eval phase equals the bytes of transformers' own cache after a
    real prefill of a tiny model (key + value per layer, GQA kv heads)."""
    from transformers import AutoModelForCausalLM

    from estimator.memory import kv_cache_bytes
    from runner.train.tinymodel import tiny_config

    cfg = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(cfg)
    ids = torch.randint(0, 100, (3, 17))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_cache_bytes(cfg, batch=3, tokens=17, value_bytes=4) == real


def test_eval_phase_and_host_ram_are_estimated_and_checked():
    """The eval phase (no-grad forward, generation with a KV cache) and host RAM are separate figures; a
    generation batch that cannot fit makes eval_fits False (the advisor refuses such a candidate)."""
    kw = dict(model="llama-3.1-8b", method="lora", batch_size=1, seq_len=2048, gpu="rtx-4090")
    small = estimate(EstimateRequest(generate_batch_size=1, max_new_tokens=64, **kw))
    big = estimate(EstimateRequest(generate_batch_size=256, max_new_tokens=2048, **kw))
    assert small.eval_fits and small.eval_memory.kv_cache_bytes > 0
    assert not big.eval_fits and big.eval_memory.phase == "generation"
    none = estimate(EstimateRequest(max_new_tokens=0, **kw))
    assert none.eval_memory.kv_cache_bytes == 0
    # host RAM: LoRA loads the bf16 base on the CPU (+ one mapped shard); QLoRA quantizes onto the GPU
    lora = small.host_memory
    assert lora.load_bytes >= small.memory.weights_bytes
    q = estimate(EstimateRequest(**dict(kw, method="qlora"))).host_memory
    assert q.load_bytes < lora.load_bytes
