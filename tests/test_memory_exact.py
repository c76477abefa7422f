"""The estimator's bytes against a REAL training step on CPU (independent measurement, not the trace code).

Expected numbers come from the real tensors of one real AdamW step of a tiny Llama-architecture model:
weights / gradients / optimizer states are summed from ``model.parameters()``, ``p.grad`` and
``optimizer.state``; activations held at the end of the forward pass are measured with saved-tensor hooks
(every tensor autograd keeps for backward, plus the loss the Trainer holds), deduplicated by storage.
"""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")

from estimator import estimate  # noqa: E402
from estimator.request import EstimateRequest  # noqa: E402

BATCH, SEQ = 2, 128


def _config(layers: int = 3, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=tie)


def _config_file(tmp_path, cfg) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def with_lora(model):
    """The LoRA the exactness tests compare against: r=8, alpha 16 on q,v, no dropout, fp32 adapters (peft's
    autocast_adapter_dtype, as the runner builds it)."""
    from peft import get_peft_model

    from estimator.params import adapter_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, adapter_config(model, method="lora", rank=8, alpha=16, targets="attention-qv",
                                                    dropout=0.0), autocast_adapter_dtype=True)


def assert_like_real(mem, real: dict, activation_tol: float, weights: bool = True) -> None:
    """Estimated weights, gradients and optimizer states equal the real step's bytes; activations within a share."""
    assert mem.activation_source == "traced"
    if weights:
        assert mem.weights_bytes == real["weights"]
    assert mem.gradients_bytes == real["grads"]
    assert mem.optimizer_bytes == real["states"]
    assert abs(mem.activations_bytes - real["activations"]) <= activation_tol * real["activations"], (
        mem.activations_bytes, real["activations"])


def _real_step(model, attention: str, dtype: str = "fp32", optimizer: str = "adamw", batch: int = BATCH,
               seq: int = SEQ):
    """One real forward/backward/optimizer step (fp32, or the weights as loaded + bf16 autocast as HF Trainer
    does with bf16=True; ``dtype="pure-bf16"``: the weights as loaded, no autocast, as Trainer with bf16=False)."""
    model.config._attn_implementation = attention
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, min(512, model.config.vocab_size), (batch, seq))
    params = list(model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in params} | {
        b.untyped_storage().data_ptr() for b in model.buffers()}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")  # pure-bf16: off
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:
            out = model(input_ids=ids, labels=ids)
    # HF Trainer's compute_loss keeps only the loss; the logits die with ``outputs`` unless autograd saved them
    held = [t for t in saved + [out.loss] if t.untyped_storage().data_ptr() not in param_ptrs]
    activations = _storage_bytes(held)
    saved.clear()
    out.loss.backward()
    trainable = [p for p in params if p.requires_grad]
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=1e-3)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=1e-3)  # Trainer's "sgd": momentum 0
    elif optimizer == "adafactor":
        from transformers.optimization import Adafactor

        opt = Adafactor(trainable, lr=1e-3, scale_parameter=False, relative_step=False)  # Trainer's "adafactor"
    else:
        raise ValueError(optimizer)
    opt.step()
    # AdamW's ``step`` counters: CPU scalars on a GPU run (foreach, not capturable), so not GPU bytes
    states = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items()
                 if k != "step" and isinstance(v, torch.Tensor))
    weights = sum(p.numel() * p.element_size() for p in params) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    return dict(weights=weights, grads=grads, states=states, activations=activations)


@pytest.mark.parametrize("method,attention,dtype", [
    ("full", "eager", "fp32"), ("full", "sdpa", "fp32"), ("lora", "eager", "fp32"), ("lora", "sdpa", "fp32"),
    # the runner's LoRA regime for bf16 runs (runner/train/recipe.py lora_base_dtype): frozen base loaded in bf16,
    # fp32 adapters (peft autocast_adapter_dtype), bf16 autocast over the step as HF Trainer does
    ("lora", "sdpa", "bf16"), ("lora", "eager", "bf16"),
    ("full", "sdpa", "bf16"),  # fp32 master weights + bf16 autocast (weight casts are activations)
])
def test_full_and_lora_match_a_real_step(tmp_path, method, attention, dtype):
    from transformers import AutoModelForCausalLM


    cfg = _config(layers=3)
    req = EstimateRequest(model=_config_file(tmp_path, cfg), method=method, dtype=dtype, batch_size=BATCH,
                          seq_len=SEQ, attention=attention, gpu="a100-80gb", rank=8, dropout=0.0)
    est = estimate(req)
    torch.manual_seed(0)
    base_dtype = torch.bfloat16 if method == "lora" and dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_config(cfg, dtype=base_dtype)
    if method == "lora":
        model = with_lora(model)
        adapter_dtypes = {p.dtype for n, p in model.named_parameters() if ".lora_" in n}
        assert adapter_dtypes == {torch.float32}  # the regime the estimator counts (2 B base, 4 B adapters)
    real = _real_step(model, attention, dtype)
    # activations: within 2% of the real run (measured equal on torch 2.13 CPU)
    assert_like_real(est.memory, real, 0.02)


def test_qlora_weights_match_a_real_bitsandbytes_load(tiny_model_dir):
    """QLoRA weights: a real NF4 + double-quant load with bitsandbytes on CPU, every stored tensor counted."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from estimator.params import adapter_config

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, quantization_config=quant)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, adapter_config(model, method="qlora", rank=8, alpha=16,
                                                     targets="attention-qv"))
    total = 0
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    counted = set()
    for mod in model.modules():
        weight = getattr(mod, "weight", None)  # peft's wrapper exposes its base layer's weight too: count once
        qs = getattr(weight, "quant_state", None)
        if qs is not None and id(weight) not in counted:
            counted.add(id(weight))
            parts = [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
            total += sum(t.numel() * t.element_size() for t in parts)
    est = estimate(EstimateRequest(model=str(tiny_model_dir), method="qlora", rank=8, batch_size=1, seq_len=64,
                                   qlora_regime="peft-upcast"))
    assert est.memory.weights_bytes == total
    # against LoRA on an fp32 base, NF4 always stores less; against a bf16 LoRA base (the runner's bf16 regime)
    # only when the Linears dominate: this tiny model is mostly embeddings, which QLoRA keeps in fp32
    # (prepare_model_for_kbit_training), so there QLoRA stores more than the bf16 LoRA base
    kw = dict(rank=8, batch_size=1, seq_len=64)
    lora32 = estimate(EstimateRequest(model=str(tiny_model_dir), method="lora", dtype="fp32", **kw))
    assert est.memory.weights_bytes < lora32.memory.weights_bytes
    lora16 = estimate(EstimateRequest(model=str(tiny_model_dir), method="lora", dtype="bf16", **kw))
    assert lora16.memory.weights_bytes < est.memory.weights_bytes < lora32.memory.weights_bytes
    big = {m: estimate(EstimateRequest(model="llama-2-7b", method=m, dtype="bf16", **kw)).memory.weights_bytes
           for m in ("qlora", "lora")}
    assert big["qlora"] < big["lora"] / 2  # 7B: NF4 Linears ~0.56 B/param vs 2 B/param


def test_nf4_formula_matches_reference():
    from estimator.nf4 import nf4_linear_bytes

    # REFERENCE.md, measured with bitsandbytes 0.50: a 4096 x 4096 Linear stores 8,655,940 bytes
    assert nf4_linear_bytes(4096 * 4096) == 8_655_940
    # 256 x 256: 32,768 packed + 1,024 absmax + 64 code + 4 offset + 16 nested absmax + 1,024 nested code
    assert nf4_linear_bytes(256 * 256) == 32_768 + 1_024 + 64 + 4 + 16 + 1_024


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_step_peak_matches_pytorch_memtracker_on_a_real_run(attention):
    """The peak of forward + backward above the weights equals PyTorch's MemTracker on a real CPU step
    (an independent tracker: torch.distributed._tools.mem_tracker, real tensors, 3-layer model)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    from estimator.trace import TraceSettings, extrapolate, trace_slice

    cfg = _config(layers=3)
    st = TraceSettings(method="full", dtype="fp32", batch_size=BATCH, seq_len=SEQ, attention=attention)
    ex = extrapolate(trace_slice(cfg, st), 3, None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config._attn_implementation = attention
    model.train()
    ids = torch.randint(0, 512, (BATCH, SEQ))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        model(input_ids=ids, labels=ids).loss.backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert peak - weights == max(ex.forward_peak_rel_bytes, ex.backward_peak_rel_bytes)


def test_lora_base_dtype_is_in_the_trace_settings_and_cache_key():
    """The 16-bit LoRA base changes the trace (no held weight casts), so it is part of the cache key: a disk
    cache of fp32-base traces cannot answer a bf16-base request."""
    from estimator.engine import trace_settings
    from estimator.trace import TraceSettings, trace_settings_key

    cfg = _config(layers=3)
    kw = dict(model="llama-2-7b", batch_size=1, seq_len=64)
    lora16 = trace_settings(EstimateRequest(method="lora", dtype="bf16", **kw))
    assert (lora16.base_dtype, lora16.weights_16bit) == ("bf16", False)
    assert trace_settings(EstimateRequest(method="lora", dtype="fp16", gpu="v100-32gb", **kw)).base_dtype == "fp16"
    assert trace_settings(EstimateRequest(method="lora", dtype="fp32", **kw)).base_dtype == "fp32"
    assert trace_settings(EstimateRequest(method="full", dtype="bf16", **kw)).base_dtype == "fp32"
    assert trace_settings(EstimateRequest(method="qlora", dtype="bf16", qlora_regime="peft-upcast",
                                          **kw)).base_dtype == "fp32"
    # the QLoRA paper's regime (the default): non-quantized weights in the compute dtype, norms fp32
    assert trace_settings(EstimateRequest(method="qlora", dtype="bf16", **kw)).base_dtype == "bf16"
    pure = trace_settings(EstimateRequest(method="full", dtype="bf16", master_dtype="bf16", **kw))
    assert pure.weights_16bit and pure.base_dtype == "fp32"  # pure bf16: 16-bit weights, no autocast
    zero3 = trace_settings(EstimateRequest(method="lora", dtype="bf16", sharding="zero3", num_gpus=2, **kw))
    assert (zero3.base_dtype, zero3.weights_16bit) == ("fp32", True)  # DeepSpeed's regime, unchanged
    ddp = trace_settings(EstimateRequest(method="lora", dtype="bf16", sharding="ddp", num_gpus=2, **kw))
    assert ddp.base_dtype == "bf16"
    st = TraceSettings(method="lora", dtype="bf16")
    assert trace_settings_key(cfg, st) != trace_settings_key(cfg, st.model_copy(update={"base_dtype": "bf16"}))


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor"])
def test_pure_bf16_full_matches_a_real_step(tmp_path, optimizer):
    """Full fine-tuning in pure bf16 (master_dtype bf16) as the runner runs it: the model loaded in bf16
    (``runner.train.recipe.full_dtype``), no autocast (``training_arguments`` bf16=False). Weights, gradients and the
    optimizer's states are read from the real tensors of a real CPU step: torch AdamW keeps bf16 moments
    (4 B per parameter instead of 8), Adafactor fp32 factors, SGD none."""
    from transformers import AutoModelForCausalLM

    cfg = _config(layers=3)
    req = EstimateRequest(model=_config_file(tmp_path, cfg), method="full", dtype="bf16", master_dtype="bf16",
                          optimizer=optimizer, batch_size=BATCH, seq_len=SEQ, attention="sdpa", gpu="a100-80gb")
    est = estimate(req)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    real = _real_step(model, "sdpa", "pure-bf16", optimizer)
    mem = est.memory
    assert mem.activation_source == "traced"
    assert mem.weights_bytes == real["weights"]
    assert mem.gradients_bytes == real["grads"]  # bf16 gradients: 2 B per parameter
    assert mem.optimizer_bytes == real["states"]
    assert abs(mem.activations_bytes - real["activations"]) <= 0.02 * real["activations"], (
        mem.activations_bytes, real["activations"])
    mixed = estimate(req.model_copy(update={"master_dtype": "fp32"}))
    # the same step with fp32 master weights: 2x weights and gradients (AdamW: 2x states too)
    assert mixed.memory.weights_bytes > 1.9 * mem.weights_bytes
    assert mixed.memory.gradients_bytes == 2 * mem.gradients_bytes


def test_pure_bf16_runner_regime(tmp_path):
    """The runner's builder and TrainingArguments for master_dtype bf16: a bf16 model and no autocast."""
    from runner.train.recipe import Run, full_dtype, pure_16bit
    from runner.spec import DatasetSpec, RunSpec

    spec = RunSpec(model="x", method="full", precision="bf16", master_dtype="bf16",
                   dataset=DatasetSpec(path="d.jsonl"))
    run = Run(spec=spec, run_dir=tmp_path)
    run.precision = "bf16"
    assert pure_16bit(run) and full_dtype(run) == torch.bfloat16
    run.precision = "fp32"  # a CPU without bf16: falls back to fp32 master weights
    assert not pure_16bit(run) and full_dtype(run) == torch.float32
    with pytest.raises(ValueError, match="master_dtype"):
        RunSpec(model="x", method="lora", precision="bf16", master_dtype="bf16", dataset=DatasetSpec(path="d"))
    with pytest.raises(ValueError, match="master_dtype"):
        EstimateRequest(model="llama-2-7b", method="full", dtype="fp16", master_dtype="bf16")


@pytest.mark.parametrize("regime", ["paper", "peft-upcast"])
def test_qlora_regimes_match_a_real_bitsandbytes_step(tiny_model_dir, regime):
    """QLoRA in both regimes the runner offers, each against a real bitsandbytes 4-bit CPU load and a real step:
    ``paper`` loads the model in bf16 and keeps only the norms fp32 (``runner.train.recipe.prepare_qlora_paper``, the
    QLoRA paper's qlora.py); ``peft-upcast`` loads fp32 and runs peft's prepare_model_for_kbit_training. Every
    stored byte (parameters, buffers, bitsandbytes' quant state), gradients, AdamW states and the activations
    of the step are compared."""
    pytest.importorskip("bitsandbytes")
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from estimator.params import adapter_config
    from runner.train.recipe import prepare_qlora_paper

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dtype = torch.bfloat16 if regime == "paper" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=load_dtype, quantization_config=quant,
                                                     attn_implementation="sdpa")
        if regime == "paper":
            model = prepare_qlora_paper(model)
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, adapter_config(model, method="qlora", rank=8, alpha=16,
                                                     targets="attention-qv", dropout=0.0),
                               autocast_adapter_dtype=True)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if "lora_" not in n and p.dtype != torch.uint8}
    if regime == "paper":
        assert {d for n, d in dtypes.items() if "norm" in n} == {torch.float32}
        assert {d for n, d in dtypes.items() if "norm" not in n} == {torch.bfloat16}  # embeddings, lm_head
    else:
        assert set(dtypes.values()) == {torch.float32}
    stored = 0
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            stored += p.numel() * p.element_size()
    stored += sum(b.numel() * b.element_size() for b in model.buffers())
    quantized = set()
    for mod in model.modules():
        weight = getattr(mod, "weight", None)  # peft's wrapper exposes its base layer's weight too: count once
        qs = getattr(weight, "quant_state", None)
        if qs is not None and id(weight) not in quantized:
            quantized.add(id(weight))
            stored += sum(t.numel() * t.element_size()
                          for t in (qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code))
    real = _real_step(model, "sdpa", "bf16")
    est = estimate(EstimateRequest(model=str(tiny_model_dir), method="qlora", rank=8, alpha=16, dropout=0.0,
                                   dtype="bf16", batch_size=BATCH, seq_len=SEQ, attention="sdpa",
                                   qlora_regime=regime))
    assert est.memory.weights_bytes == stored
    assert est.memory.gradients_bytes == real["grads"]
    assert est.memory.optimizer_bytes == real["states"]
    assert abs(est.memory.activations_bytes - real["activations"]) <= 0.02 * real["activations"], (
        est.memory.activations_bytes, real["activations"])
