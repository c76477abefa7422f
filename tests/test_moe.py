"""MoE models as transformers 5 builds them (fused 3D experts): storage, traced activations and FLOPs against
real CPU steps of tiny Mixtral / Qwen3-MoE models and a real bitsandbytes 4-bit load.

Expected numbers are measured on the real thing, never by the estimator's own code: weights, gradients and
AdamW states from the real tensors of one real step, activations with saved-tensor hooks
(``test_memory_exact._real_step``), 4-bit storage from the ``Params4bit`` tensors and their quant states.
The real steps route tokens with the models' own (random) routers while the trace splits the token-expert
pairs evenly: transformers' grouped experts layout sizes every tensor by tokens x top_k, so the bytes do not
depend on the routing (measured equal below).
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")

from estimator import estimate  # noqa: E402
from estimator.request import EstimateRequest  # noqa: E402
from test_memory_exact import BATCH, SEQ, _real_step, assert_like_real, with_lora  # noqa: E402


def _mixtral(layers: int = 3):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=512, tie_word_embeddings=False)


def _qwen3_moe(layers: int = 3):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          num_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


CONFIGS = {"mixtral": _mixtral, "qwen3_moe": _qwen3_moe}


def _config_file(tmp_path, cfg) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def _saved_model(tmp_path, cfg):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / "model"
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


def _quant_config():
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _stored_bytes(model) -> int:
    """Every byte a (4-bit) model stores: parameters, buffers, bitsandbytes' quant states (counted once)."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    counted = set()
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None and id(weight) not in counted:
            counted.add(id(weight))
            total += sum(t.numel() * t.element_size()
                         for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))
    return total


def test_bitsandbytes_load_leaves_fused_experts_unquantized(tmp_path):
    """What a real ``load_in_4bit`` load of a tiny Mixtral yields with transformers 5 + bitsandbytes: every
    attention Linear is ``Params4bit``, the fused experts stay 3D tensors in the load dtype. This is why the
    runner quantizes them itself (if this test fails, transformers started quantizing them: drop that step)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    folder = _saved_model(tmp_path, _mixtral(layers=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, quantization_config=_quant_config())
    params = dict(model.named_parameters())
    assert type(params["model.layers.0.self_attn.q_proj.weight"]).__name__ == "Params4bit"
    experts = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert type(experts).__name__ == "Parameter" and experts.dtype == torch.float32
    assert tuple(experts.shape) == (4, 256, 64)


@pytest.mark.parametrize("regime", ["paper", "peft-upcast"])
def test_qlora_experts_quantized_by_the_runner_and_counted_exactly(tmp_path, regime):
    """The runner's QLoRA on a tiny Mixtral (real 4-bit load, runner.train.experts.quantize_fused_experts, the
    regime's preparation, LoRA): every expert matrix is a Params4bit, and the estimate's weight bytes equal
    every stored byte of that real model."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from estimator.params import adapter_config
    from runner.train.experts import quantize_fused_experts
    from runner.train.recipe import prepare_qlora_paper

    cfg = _mixtral(layers=3)
    folder = _saved_model(tmp_path, cfg)
    load_dtype = torch.bfloat16 if regime == "paper" else torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=load_dtype, quantization_config=_quant_config(),
                                                     attn_implementation="sdpa")
        assert quantize_fused_experts(model, torch.bfloat16) == (3, [])
        model = prepare_qlora_paper(model) if regime == "paper" else prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=False)
        model = get_peft_model(model, adapter_config(model, method="qlora", rank=8, alpha=16,
                                                     targets="attention-qv", dropout=0.0),
                               autocast_adapter_dtype=True)
    expert_weights = [p for n, p in model.named_parameters() if ".experts." in n]
    assert len(expert_weights) == 3 * 4 * 2  # layers x experts x (gate_up, down)
    assert {type(p).__name__ for p in expert_weights} == {"Params4bit"}
    real = _real_step(model, "sdpa", "bf16")
    est = estimate(EstimateRequest(model=str(folder / "config.json"), method="qlora", rank=8, alpha=16, dropout=0.0,
                                   dtype="bf16", batch_size=BATCH, seq_len=SEQ, attention="sdpa",
                                   qlora_regime=regime))
    assert est.memory.weights_bytes == _stored_bytes(model)
    assert est.memory.gradients_bytes == real["grads"]
    assert est.memory.optimizer_bytes == real["states"]
    assert est.memory.activation_source == "traced"
    assert abs(est.memory.activations_bytes - real["activations"]) <= 0.03 * real["activations"], (
        est.memory.activations_bytes, real["activations"])


def test_nf4_experts_compute_what_the_fused_experts_compute(tmp_path):
    """NF4Experts (grouped layout, per-expert Linear4bit) gives the same output as transformers' own fused
    experts module holding the same (dequantized NF4) weights, on real routing."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    from runner.train.experts import quantize_fused_experts

    cfg = _mixtral(layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    block = model.model.layers[0].mlp
    fused = block.experts
    import copy

    reference = copy.deepcopy(fused)
    quantize_fused_experts(model, torch.float32)
    nf4 = block.experts
    assert type(nf4).__name__ == "NF4Experts"
    with torch.no_grad():
        for e in range(cfg.num_local_experts):  # the reference gets exactly the weights NF4 stores
            for lin, name in ((nf4.up[e], "gate_up_proj"), (nf4.down[e], "down_proj")):
                getattr(reference, name)[e] = bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        x = torch.randn(24, cfg.hidden_size)
        _, weights, index = block.gate(x)
        out = nf4(x, index, weights)
        expected = reference(x, index, weights)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("method,dtype", [("full", "bf16"), ("full", "fp32"), ("lora", "bf16"), ("lora", "fp32")])
def test_moe_activations_match_a_real_cpu_step(tmp_path, arch, method, dtype):
    """Traced activations of full fine-tuning and LoRA on tiny MoE models within 3% of a real CPU step
    (measured: full exact, LoRA fp32 exact, LoRA bf16 +1.1% Mixtral / +1.4% Qwen3-MoE); weights, gradients
    and AdamW states exact."""
    from transformers import AutoModelForCausalLM


    cfg = CONFIGS[arch]()
    est = estimate(EstimateRequest(model=_config_file(tmp_path, cfg), method=method, dtype=dtype, batch_size=BATCH,
                                   seq_len=SEQ, attention="sdpa", gpu="a100-80gb", rank=8, dropout=0.0))
    torch.manual_seed(0)
    base = torch.bfloat16 if method == "lora" and dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=base)
    if method == "lora":
        model = with_lora(model)
    assert_like_real(est.memory, _real_step(model, "sdpa", dtype), 0.03)


def test_moe_flops_count_the_active_experts_only(tmp_path):
    """The traced FLOPs of a full step are 6 x (matmul parameters a token meets) x tokens: attention, the
    router, top-2 of the 4 experts and the LM head (computed here from the config, not the trace)."""
    cfg = _mixtral(layers=3)
    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    attention = h * h + 2 * h * kv + h * h
    experts = cfg.num_experts_per_tok * 3 * h * inter  # gate, up, down of each active expert
    router = h * cfg.num_local_experts
    per_token = cfg.num_hidden_layers * (attention + experts + router) + h * cfg.vocab_size
    est = estimate(EstimateRequest(model=_config_file(tmp_path, cfg), method="full", dtype="bf16",
                                   batch_size=BATCH, seq_len=SEQ, attention="sdpa", tokens=1_000_000))
    assert est.compute.flops_source == "traced"
    assert est.compute.flops_per_token == 6 * per_token


def test_mixtral_qlora_weights_are_nf4_experts():
    """Mixtral-8x7B QLoRA: the experts (45.1B of 46.7B parameters) are NF4, so the weights are about 0.5 B per
    parameter, not the 169.7 GiB of unquantized fp32 experts counted before."""
    est = estimate(EstimateRequest(model="mixtral-8x7b", method="qlora", batch_size=1, seq_len=64))
    gib = est.memory.weights_bytes / 1024**3
    assert 21 < gib < 25, gib  # 46.7e9 x ~0.53 B (NF4 + double-quant constants) + 16-bit embeddings/head


def _recipe_model(tmp_path, folder, spec, builder: str):
    """The recipe's own builder (``_build_qlora`` / ``_build_lora``) on ``spec``: (the recipe's Run, the model)."""
    from runner.train import recipe

    r = recipe.Run(spec=spec, run_dir=tmp_path)
    r.model_dir, r.tokenizer, r.precision, r.max_steps = folder, recipe.load_tokenizer(folder), spec.precision, 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return r, getattr(recipe, builder)(r)


def _tiny_mixtral_qlora(tmp_path):
    """The recipe's QLoRA builder on a tiny Mixtral folder (bf16): (folder, the recipe's Run, the built model)."""
    pytest.importorskip("bitsandbytes")
    from runner.spec import DatasetSpec, RunSpec
    from runner.train.tinymodel import build_tiny_model

    folder = build_tiny_model(tmp_path / "mixtral", arch="mixtral")
    spec = RunSpec(model=str(folder), dataset=DatasetSpec(path="unused.jsonl"), method="qlora", precision="bf16")
    return (folder, *_recipe_model(tmp_path, folder, spec, "_build_qlora"))


def test_runner_qlora_builder_quantizes_the_experts_and_trains(tmp_path):
    """The recipe's QLoRA builder on a tiny Mixtral folder (runner.train.tinymodel): experts Params4bit, the run note
    says so, a real forward/backward step has a finite loss and gradients only on the adapters, and the
    estimate's weight bytes equal every byte the built model stores."""
    folder, r, model = _tiny_mixtral_qlora(tmp_path)
    experts = {type(p).__name__ for n, p in model.named_parameters() if ".experts." in n}
    assert experts == {"Params4bit"}
    assert any("fused experts" in n and "NF4" in n for n in r.notes)
    stored = _stored_bytes(model)  # before any forward: bitsandbytes repacks 4-bit weights for CPU inference
    model.train()  # as the Trainer runs it
    ids = torch.randint(0, 100, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    est = estimate(EstimateRequest(model=str(folder), method="qlora", batch_size=1, seq_len=16))
    assert est.memory.weights_bytes == stored


def test_presets_resolve_the_same_before_and_after_the_expert_swap():
    """The runner resolves targets after quantize_fused_experts, the estimator on the fused meta model: one
    resolution (estimator.params.resolve_targets) must give both the same names (OLMoE: peft would move
    gate/up/down_proj onto the experts, so all-linear is the attention Linears either way)."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, OlmoeConfig

    from estimator.params import resolve_targets
    from estimator.request import TARGET_PRESETS
    from runner.train.experts import quantize_fused_experts

    cfg = OlmoeConfig(vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                      max_position_embeddings=512, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    before = {p: resolve_targets(model, p) for p in TARGET_PRESETS}
    assert quantize_fused_experts(model, torch.bfloat16)[0] == 2
    assert {p: resolve_targets(model, p) for p in TARGET_PRESETS} == before
    assert before["all-linear"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def _load_configs():
    """Tiny configs of the MoE families whose QLoRA load is measured: Mixtral and Qwen3-MoE (CONFIGS), OLMoE,
    PhiMoE (Mixtral's layout, LayerNorms with biases), Qwen2-MoE (shared expert) and DeepSeek-V2 (MLA, a shared
    expert, a dense first layer)."""
    import transformers as tf

    common = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                  max_position_embeddings=512)
    return CONFIGS | {
        "olmoe": lambda layers: tf.OlmoeConfig(intermediate_size=32, num_experts=8, num_experts_per_tok=2, **common),
        "phimoe": lambda layers: tf.PhimoeConfig(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                                 **common),
        "qwen2_moe": lambda layers: tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=64, num_experts=8,
                                                      num_experts_per_tok=2, **common),
        "deepseek_v2": lambda layers: tf.DeepseekV2Config(
            intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **common),
    }


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "phimoe", "qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("regime", ["paper", "peft-upcast"])
def test_qlora_load_peak_matches_the_runners_real_load(tmp_path, arch, regime, monkeypatch):
    """The load of QLoRA on a tiny MoE as the runner loads it (``recipe.load_4bit``: a real transformers +
    bitsandbytes 4-bit load on CPU, each fused experts tensor quantized as it is set), measured op by op with
    ``live_bytes.LiveBytes`` (storages alive after each op; the fp16 checkpoint makes every tensor a copy in the
    load dtype, as on a GPU). Mixtral's checkpoint loads gate/up before down, Qwen3-MoE's down first. The
    estimate's ``load_peak_bytes`` is that peak within 1% (the model's names stand in for the checkpoint's: measured
    0.25% or less, PhiMoE 0.63%, which renames block_sparse_moe), and below the peak of the same load quantizing after
    ``from_pretrained`` (every expert in the load dtype at once; measured 0.57 vs 0.93 MB on this 3-layer Mixtral in bf16)."""
    pytest.importorskip("bitsandbytes")
    from live_bytes import LiveBytes
    from runner.spec import DatasetSpec, RunSpec
    from runner.train import recipe
    from runner.train.tinymodel import build_tokenizer
    from transformers import AutoModelForCausalLM

    cfg = _load_configs()[arch](layers=3)
    tok = build_tokenizer()
    cfg.vocab_size, cfg.pad_token_id = len(tok), tok.pad_token_id
    folder = tmp_path / arch
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).save_pretrained(folder)
    tok.save_pretrained(folder)
    spec = RunSpec(model=str(folder), dataset=DatasetSpec(path="unused.jsonl"), method="qlora", precision="bf16",
                   qlora_regime=regime)
    r = recipe.Run(spec=spec, run_dir=tmp_path)
    r.model_dir, r.tokenizer, r.precision = folder, tok, "bf16"
    with warnings.catch_warnings(), LiveBytes() as live:
        warnings.simplefilter("ignore")
        model, _ = recipe.load_4bit(r)  # the paper regime loads bf16, peft-upcast fp32
    assert {type(p).__name__ for n, p in model.named_parameters() if ".experts." in n} == {"Params4bit"}
    assert any("quantized to NF4 while loading" in n for n in r.notes)
    assert live.peak_op in ("aten.stack.default", "aten.cat.default")  # building a fused tensor, not quantizing
    est = estimate(EstimateRequest(model=str(folder), method="qlora", batch_size=1, seq_len=16, qlora_regime=regime))
    assert abs(est.memory.load_peak_bytes - live.peak) <= 0.01 * live.peak, (est.memory.load_peak_bytes, live.peak)
    # the same load with the experts quantized only after from_pretrained (the runner before): every layer's
    # experts in the load dtype at once
    import contextlib

    import runner.train.experts as experts_mod

    monkeypatch.setattr(experts_mod, "quantize_experts_while_loading", lambda *a, **k: contextlib.nullcontext())
    with warnings.catch_warnings(), LiveBytes() as after:
        warnings.simplefilter("ignore")
        recipe.load_4bit(r)
    assert live.peak < after.peak, (live.peak, after.peak)
    assert est.fits and est.load_fits and any(n.startswith("loading:") for n in est.notes)


def test_mixtral_8x7b_qlora_loads_on_one_a100_80gb():
    """Mixtral-8x7B QLoRA (paper regime) on an A100-80GB: the load peaks at the last layer's experts built in
    bf16 beside the 4-bit model: its gate_up (8 x 28672 x 4096 x 2 B = 1.75 GiB, from the config) still held while
    its down_proj (half that) is stacked from the per-expert w2 (2x), so weights + 3.5 GiB less what is not loaded
    yet (that layer's 4-bit down, 0.22 GiB; its attention; the adapters): not the 86 GiB of every bf16 expert."""
    est = estimate(EstimateRequest(model="mixtral-8x7b", method="qlora", batch_size=1, seq_len=512, gpu="a100-80gb",
                                   grad_checkpointing=True, qlora_regime="paper"))
    gate_up = 8 * 28672 * 4096 * 2
    extra = est.memory.load_peak_bytes - est.memory.weights_bytes
    assert 2 * gate_up - gate_up / 8 - 2**27 < extra < 2 * gate_up - gate_up / 8, extra / 2**30
    assert est.load_fits and est.fits


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_experts_preset_matches_a_real_cpu_step(tmp_path, arch, dtype):
    """``all-linear+experts``: every Linear but the LM head plus a LoRA on each fused routed-expert weight
    through peft's ``target_parameters`` (``ParamWrapper``). Against a real CPU step of the real peft model
    (the runner's regime: fp32, or a bf16 base with fp32 adapters under bf16 autocast): adapter count,
    weights, gradients and AdamW states exact, activations within 3% (measured exact in fp32)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from estimator.params import adapter_config

    cfg = CONFIGS[arch]()
    est = estimate(EstimateRequest(model=_config_file(tmp_path, cfg), method="lora", dtype=dtype, batch_size=BATCH,
                                   seq_len=SEQ, attention="sdpa", rank=8, alpha=16, dropout=0.0,
                                   targets="all-linear+experts"))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, adapter_config(model, method="lora", rank=8, alpha=16,
                                                     targets="all-linear+experts", dropout=0.0),
                               autocast_adapter_dtype=True)
    expert_adapters = [n for n, p in model.named_parameters() if p.requires_grad and ".experts." in n]
    assert len(expert_adapters) == 2 * 2 * cfg.num_hidden_layers  # (gate_up, down) x (A, B) per layer
    assert est.model.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert_like_real(est.memory, _real_step(model, "sdpa", dtype), 0.03)
    lora = estimate(EstimateRequest(model=_config_file(tmp_path, cfg), method="lora", dtype=dtype, batch_size=BATCH,
                                    seq_len=SEQ, attention="sdpa", rank=8, alpha=16, dropout=0.0,
                                    targets="all-linear"))
    assert est.model.trainable_params > lora.model.trainable_params


def test_experts_preset_refusals_and_runner(tmp_path):
    """The preset's named refusals (QLoRA's NF4 experts, dropout, DoRA, a dense model) and the runner's LoRA
    builder adapting the experts of a tiny Mixtral folder, with a finite loss and gradients on them."""
    from estimator.errors import EstimatorError
    from runner.errors import RunnerError
    from runner.spec import DatasetSpec, PeftSettings, RunSpec
    from runner.train import recipe
    from runner.train.tinymodel import build_tiny_model

    path = _config_file(tmp_path, _mixtral(layers=2))
    kw = dict(model=path, batch_size=1, seq_len=16, targets="all-linear+experts")
    for bad, field in ((dict(method="qlora", dropout=0.0), "targets"), (dict(method="lora", dropout=0.05), "dropout"),
                       (dict(method="lora", dropout=0.0, dora=True), "targets")):
        with pytest.raises(EstimatorError) as err:
            estimate(EstimateRequest(**kw, **bad))
        assert err.value.field == field and "all-linear+experts" in str(err.value)
    with pytest.raises(EstimatorError, match="no fused routed experts"):
        estimate(EstimateRequest(model="qwen2.5-0.5b", method="lora", dropout=0.0, targets="all-linear+experts"))

    folder = build_tiny_model(tmp_path / "mixtral", arch="mixtral")
    peft = PeftSettings(target_modules="all-linear+experts", dropout=0.0, r=4, alpha=8.0)
    spec = RunSpec(model=str(folder), dataset=DatasetSpec(path="unused.jsonl"), method="lora", precision="fp32",
                   peft=peft)
    r, model = _recipe_model(tmp_path, folder, spec, "_build_lora")
    ids = torch.randint(0, 100, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    experts = [n for n, p in model.named_parameters() if ".experts." in n and p.grad is not None]
    assert experts and all(".lora_" in n for n in experts)
    est = estimate(EstimateRequest(model=str(folder), method="lora", dtype="fp32", rank=4, alpha=8, dropout=0.0,
                                   targets="all-linear+experts", batch_size=1, seq_len=16))
    assert est.model.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    r.spec = spec.model_copy(update={"peft": peft.model_copy(update={"dropout": 0.05})})
    with pytest.raises(RunnerError, match="dropout"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            recipe._build_lora(r)


def test_runner_qlora_paper_regime_runs_outside_autocast(tmp_path):
    """The paper regime's fp32 norms hand fp32 hidden states to the 16-bit Linears bitsandbytes leaves alone
    (LM head) and to Mixtral's router (``MixtralTopKRouter``, a plain 16-bit weight): without autocast (generation,
    the eval loss, a CPU run) the recipe's cast hooks keep them working. Before, the router failed with
    "expected m1 and m2 to have the same dtype" (found by ``benchmarks/gpu_check.py --smoke --cases moe-qlora``)."""
    folder, r, model = _tiny_mixtral_qlora(tmp_path)
    assert any("Router" in type(m).__name__ and m.weight.dtype == torch.bfloat16 for m in model.modules())
    ids = torch.randint(0, 100, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss  # no autocast
    loss.backward()
    assert torch.isfinite(loss)
