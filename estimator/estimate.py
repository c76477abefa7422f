"""``estimate(request) -> Estimate``: parameters, per-GPU memory of one training step, time, cost, storage.

Pure computation (no printing): ``estimator/cli.py`` and the app pages format the result. Every assumption
is written into ``Estimate.notes``. Results are cached per request (in memory), traces also on disk.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from estimator.compute import ComputeInfo, compute_info, formula_flops_per_token
from estimator.errors import EstimatorError
from estimator.memory import (EvalMemory, HostMemory, Inventory, StepMemory, TensorInfo, card_memory,
                              cublas_workspace_bytes, eval_memory, fit_limit_bytes, formula_activations,
                              host_memory, step_memory)
from estimator.request import EstimateRequest

#: Bump when an estimate's figures or fields change meaning in a way the code does not show (a library behaviour
#: the figures rely on): ``estimator.result_cache`` keys stored estimates by it. Edits to ``estimator/*.py`` and
#: the shipped tables invalidate stored estimates by themselves (their contents are hashed into the key).
ESTIMATOR_VERSION = 1

# --------------------------------------------------------------------------------------------- result types


class ModelInfo(BaseModel):
    id: str
    display_name: str
    total_params: int = Field(description="all parameters, tied ones once")
    trainable_params: int
    active_params: int = Field(description="parameters used per token (MoE: top-k experts)")
    breakdown: Any = Field(description="ParamBreakdown by part (embeddings, attention, mlp, norms, head, other)")
    num_layers: int
    hidden_size: int
    vocab_size: int
    model_type: str
    published_params: int | None = None


class MemoryBreakdown(BaseModel):
    """Per-GPU bytes of one steady-state training step."""

    weights_bytes: int = Field(description="weights on the GPU, adapter weights included")
    gradients_bytes: int = Field(description="gradients alive at the optimizer step")
    optimizer_bytes: int = Field(description="optimizer states on the GPU")
    activations_bytes: int = Field(description="held at the end of the forward pass (loss included)")
    overhead_bytes: int = Field(description="cuBLAS workspaces + CUDA context (+ NCCL buffers, DDP buckets)")
    optimizer_temp_bytes: int = Field(0, description="temporaries of the optimizer step")
    gathered_bytes: int = Field(0, description="ZeRO-3/FSDP unsharded layers")
    offloaded_bytes: int = Field(0, description="kept in CPU memory by offload")
    peak_bytes: int = Field(description="what the card holds at the peak of the step (= device_peak_bytes): "
                                         "reserved peak + CUDA context (+ NCCL); fits is decided on it")
    peak_phase: str = Field(description="forward/loss end | backward | optimizer step")
    phase_peaks: dict[str, int] = Field(default_factory=dict, description="device bytes of each phase")
    allocated_phase_peaks: dict[str, int] = Field(default_factory=dict, description="allocated bytes of each phase")
    allocated_peak_bytes: int = Field(0, description="tensors + cuBLAS workspaces at the peak: what "
                                                     "torch.cuda.max_memory_allocated reports")
    reserved_peak_bytes: int = Field(0, description="allocated + the caching allocator's cached/fragmented "
                                                    "blocks: what torch.cuda.max_memory_reserved reports")
    allocator_cache_bytes: int = Field(0, description="reserved minus allocated")
    context_bytes: int = Field(0, description="CUDA context (outside the allocator)")
    nccl_bytes: int = Field(0, description="NCCL buffers (outside the allocator, multi-GPU)")
    usable_bytes: int = Field(0, description="the card's usable memory (nvidia-smi total)")
    headroom_bytes: int = Field(0, description="kept free above the peak before calling it a fit")
    margin_bytes: int = Field(0, description="usable - headroom - peak; negative when it does not fit")
    activation_source: str = Field(description="traced | formula")
    method_note: str = ""


class GPUInfo(BaseModel):
    id: str
    name: str
    count: int
    memory_bytes: int = Field(description="datasheet capacity")
    usable_bytes: int = Field(0, description="what a process can fill (nvidia-smi total)")
    bf16_support: bool
    price_usd_per_hour: float


class StorageInfo(BaseModel):
    """Bytes on disk per task: a full checkpoint (weights as trained, fp32) vs an adapter."""

    checkpoint_bytes: int = Field(description="a full fine-tuned model's weights as saved (safetensors payload)")
    adapter_bytes: int | None = Field(None, description="adapter_model.safetensors (LoRA/QLoRA)")
    base_bytes: int = Field(description="the base model in 16-bit, shared by every adapter")


class Estimate(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    request: EstimateRequest
    model: ModelInfo
    method: str
    memory: MemoryBreakdown
    gpu: GPUInfo
    fits: bool
    adapter_bytes: int | None
    checkpoint_bytes: int
    compute: ComputeInfo
    storage: StorageInfo
    notes: list[str]
    trace_seconds: float | None = None
    eval_memory: EvalMemory | None = Field(None, description="the eval phase (no-grad forward, generation)")
    eval_fits: bool = Field(True, description="the eval phase fits the card too")
    host_memory: HostMemory | None = Field(None, description="host RAM of one training process")

    def to_json(self) -> dict:
        """The CLI's ``--json`` object: this model's fields, nested as they are here (``.memory.peak_bytes``,
        ``.model.total_params``, ``.compute.cost_usd``, ``.request.sharding``), per-GPU bytes."""
        return self.model_dump(mode="json")


# ------------------------------------------------------------------------------------------ inventory


_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search("." + name)
    return int(m.group(1)) if m else None


def _matches(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with ``.`` + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _build_inventory(entry, req: EstimateRequest) -> tuple[Inventory, Any, list[str]]:
    """Every parameter as trained: base (frozen or not, NF4 for QLoRA) + adapter tensors.

    Read from the meta model of the traced slice (2 or 3 layers) and replicated for the other layers (each
    layer after the first has the same tensors as its slice twin), so a 405B estimate never builds 126 layers.
    Adapter shapes follow peft's LoRA layer (``lora_A``: r x in, ``lora_B``: out x r, DoRA magnitude: out,
    AdaLoRA ``lora_E``: r x 1); ``tests/test_estimate.py`` checks the counts against the full meta model and
    ``params.count_adapter`` (the real peft on meta).
    Returns the inventory, the slice meta model and the resolved target names.
    """
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    from estimator.params import build_meta_model, resolve_targets
    from estimator.trace import _layer_types, layer_map, slice_config, slice_layer_count

    config = entry.hf_config()
    num_layers = _num_layers(config)
    types = _layer_types(config)
    n_slice = min(slice_layer_count(types), num_layers)
    model = build_meta_model(slice_config(config, n_slice))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: list[str] = []
    if req.method != "full":
        targets = resolve_targets(model, req.targets if isinstance(req.targets, str) else list(req.targets))
    tensors: list[TensorInfo] = []
    seen: set[int] = set()
    trainable_base = req.method == "full"
    # QLoRA: fused experts are stored as one NF4 Linear per expert and matrix (runner/train/experts.py NF4Experts)
    nf4_experts = set()
    if req.method == "qlora":
        from estimator.experts import fused_experts, unsupported_reason

        nf4_experts = {id(m) for _, m in fused_experts(model) if unsupported_reason(m) is None}
    for mod_name, module in model.named_modules():
        is_linear = isinstance(module, (nn.Linear, Conv1D)) and module is not head and bool(mod_name)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(module) in nf4_experts and p.ndim == 3:
                tensors.extend(TensorInfo(name=f"{full}.{e}", shape=tuple(p.shape[1:]), trainable=False,
                                          quantized=True, layer=_layer_of(full)) for e in range(p.shape[0]))
                continue
            quant = req.method == "qlora" and is_linear and p_name == "weight"
            tensors.append(TensorInfo(name=full, shape=tuple(p.shape), trainable=trainable_base, quantized=quant,
                                      layer=_layer_of(full)))
        if is_linear and req.method != "full" and _matches(mod_name, targets):
            if isinstance(module, Conv1D):
                d_in, d_out = module.weight.shape
            else:
                d_out, d_in = module.weight.shape
            layer = _layer_of(mod_name + ".")
            r = req.rank
            # AdaLoRA keeps A, B, E in ParameterDicts: peft saves them without the ".weight" suffix
            suffix = "" if req.adalora else ".weight"
            tensors.append(TensorInfo(name=f"{mod_name}.lora_A{suffix}", shape=(r, d_in), trainable=True, layer=layer,
                                      adapter=True))
            tensors.append(TensorInfo(name=f"{mod_name}.lora_B{suffix}", shape=(d_out, r), trainable=True, layer=layer,
                                      adapter=True))
            if req.adalora:
                tensors.append(TensorInfo(name=f"{mod_name}.lora_E", shape=(r, 1), trainable=True, layer=layer,
                                          adapter=True))
                tensors.append(TensorInfo(name=f"{mod_name}.ranknum", shape=(1,), trainable=False, layer=layer,
                                          adapter=True))
            if req.dora:
                tensors.append(TensorInfo(name=f"{mod_name}.lora_magnitude_vector", shape=(d_out,), trainable=True,
                                          layer=layer, adapter=True))
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    mapping = layer_map(types, num_layers, n_slice)
    # buffers inside a layer (DeepSeek-V3's router e_score_correction_bias) repeat with the layer
    layer_buffers: dict[int, int] = {}
    for b_name, b in model.named_buffers():
        if _layer_of(b_name) is not None:
            layer_buffers[_layer_of(b_name)] = layer_buffers.get(_layer_of(b_name), 0) + b.numel() * b.element_size()
    buffer_bytes += sum(layer_buffers.get(mapping[i], 0) for i in range(n_slice, num_layers))
    by_layer: dict[int, list[TensorInfo]] = {}
    for t in tensors:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    for i in range(n_slice, num_layers):
        j = mapping[i]
        for t in by_layer.get(j, []):
            name = _LAYER_RE.sub(lambda m: m.group(0).replace(f".{j}.", f".{i}."), "." + t.name, count=1)[1:]
            tensors.append(t.model_copy(update={"name": name, "layer": i}))
    return Inventory(tensors=tensors, buffer_bytes=buffer_bytes, num_layers=num_layers), model, targets


def _breakdown(model, config, num_layers: int):
    """``ParamBreakdown`` of the full model from its slice: slice counts + the replicated layers' counts."""
    from estimator.params import ParamBreakdown, _moe_sizes, count_parameters
    from estimator.trace import _decoder_layers, _layer_types, layer_map

    sliced = count_parameters(model)
    layers = _decoder_layers(model)
    n_slice = len(layers)
    fields = ("total", "embeddings", "attention", "mlp", "norms", "head", "other", "experts")
    counts = {f: getattr(sliced, f) for f in fields}
    per_layer = [count_parameters(layer) for layer in layers]
    for j in layer_map(_layer_types(config), num_layers, n_slice)[n_slice:]:
        for f in fields:
            counts[f] += getattr(per_layer[j], f)
    n_exp, top_k = _moe_sizes(config)
    active = counts["total"]
    if counts["experts"] and n_exp and top_k:
        active = counts["total"] - counts["experts"] + counts["experts"] * top_k // n_exp
    return ParamBreakdown(active=active, **counts)


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EstimatorError("config.json: num_hidden_layers is missing; add the model's layer count", field="config")


# ------------------------------------------------------------------------------------------------ checks


def _check_request(req: EstimateRequest, config, gpu) -> None:
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(max_pos, int) and req.seq_len > max_pos:
        raise EstimatorError(
            f"seq_len: {req.seq_len} tokens is longer than this model's context of {max_pos} "
            f"(max_position_embeddings); use --seq-len {max_pos} or less", field="seq_len")
    if req.dtype == "bf16" and not gpu.bf16_support:
        raise EstimatorError(f"dtype: {gpu.name} has no bf16 support; use --dtype fp16 (or fp32), or a newer GPU",
                             field="dtype")
    if req.method == "full" and (req.dora or req.rslora or req.adalora):
        raise EstimatorError("method: --dora/--rslora/adalora apply to LoRA and QLoRA, not full fine-tuning; "
                             "use --method lora", field="method")
    if req.method == "qlora" and req.sharding in ("zero1", "zero2", "zero3") and req.num_gpus > 1:
        pass  # supported: adapters are what the optimizer sees; frozen NF4 weights are sharded by ZeRO-3


# ------------------------------------------------------------------------------------------------ estimate


def _weights_16bit(req: EstimateRequest) -> bool:
    """ZeRO/FSDP keep the module in 16-bit (their own fp32 master copy), no autocast."""
    return req.sharding in ("zero1", "zero2", "zero3", "fsdp") and req.method != "qlora" and req.dtype != "fp32"


def _pure16(req: EstimateRequest) -> bool:
    """Pure 16-bit full fine-tuning: the model loaded in bf16/fp16, trained without autocast or master copy."""
    return req.method == "full" and req.master_dtype != "fp32"


def _base_dtype(req: EstimateRequest) -> str:
    """dtype of the frozen base weights: LoRA bf16/fp16 runs on one GPU or DDP load the base in that dtype
    (``runner/train/recipe.py`` ``lora_base_dtype``); full fine-tuning keeps fp32 master weights, QLoRA stores NF4,
    and ZeRO/FSDP cast the module themselves (``_weights_16bit``)."""
    if req.method == "lora" and req.dtype != "fp32" and req.sharding in ("none", "ddp"):
        return req.dtype
    if (req.method == "qlora" and req.qlora_regime == "paper" and req.dtype != "fp32"
            and req.sharding in ("none", "ddp")):
        return req.dtype  # the QLoRA paper's regime: non-quantized weights in the compute dtype, norms fp32
    return "fp32"


def trace_settings(req: EstimateRequest, batch_size: int | None = None, seq_len: int | None = None):
    from estimator.trace import TraceSettings

    targets = req.targets if isinstance(req.targets, str) else tuple(req.targets)
    return TraceSettings(method=req.method, rank=req.rank, alpha=req.effective_alpha, targets=targets,
                         dora=req.dora, rslora=req.rslora, adalora=req.adalora, dropout=req.dropout,
                         dtype=req.dtype, weights_16bit=_weights_16bit(req) or _pure16(req),
                         base_dtype=_base_dtype(req),
                         batch_size=batch_size or req.batch_size, seq_len=seq_len or req.seq_len,
                         grad_checkpointing=req.grad_checkpointing, attention=req.attention)


class _Activations(BaseModel):
    held: int
    forward_peak_rel: int
    backward_peak_rel: int
    flops: float
    source: str
    seconds: float | None = None
    note: str | None = None
    slice_layers: int = 2
    attention: str = "sdpa"


def _activations(config, req: EstimateRequest, num_layers: int, batch_size: int | None = None,
                 seq_len: int | None = None) -> _Activations:
    """Traced activations (or the formula, with the reason) for this request's knobs."""
    from estimator.trace import TraceError, _layer_types, extrapolate, trace_slice

    settings = trace_settings(req, batch_size, seq_len)
    note = None
    if settings.attention == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        # transformers refuses sdpa with attention-logit softcapping (Gemma-2): the run has to use eager
        settings = settings.model_copy(update={"attention": "eager"})
        note = (f"{config.model_type} caps attention logits (attn_logit_softcapping), which sdpa does not "
                "support: traced with eager attention, as the run must use")
    try:
        trace = trace_slice(config, settings)
        ex = extrapolate(trace, num_layers, _layer_types(config))  # layer kinds: attention type, dense/MoE
        return _Activations(held=ex.activations_bytes, forward_peak_rel=ex.forward_peak_rel_bytes,
                            backward_peak_rel=ex.backward_peak_rel_bytes, flops=ex.flops, source="traced",
                            seconds=trace.seconds, note=note, slice_layers=trace.slice_layers,
                            attention=settings.attention)
    except TraceError as exc:
        b, s = settings.batch_size, settings.seq_len
        held, fwd, bwd = formula_activations(config, batch_size=b, seq_len=s, attention=settings.attention,
                                             grad_checkpointing=req.grad_checkpointing, dtype=req.dtype)
        moe = " (MoE: expert activations depend on the routing and are not in the formula)" if getattr(
            config, "num_local_experts", None) or getattr(config, "num_experts", None) else ""
        return _Activations(held=held, forward_peak_rel=fwd, backward_peak_rel=bwd, flops=0.0, source="formula",
                            note=f"activations by formula (Korthikanti et al. 2022 + logits): the trace failed "
                                 f"for this architecture ({str(exc)[:200]}){moe}", attention=settings.attention)


def estimate(req: EstimateRequest) -> Estimate:
    """The estimate for ``req`` (cached: the same request returns the same object in microseconds)."""
    if not isinstance(req, EstimateRequest):
        raise EstimatorError("request: pass an EstimateRequest", field="request")
    return _estimate_cached(req.model_dump_json())


@functools.lru_cache(maxsize=512)
def _estimate_cached(req_json: str) -> Estimate:
    return _estimate(EstimateRequest.model_validate_json(req_json))


@functools.lru_cache(maxsize=64)
def _model_facts(req_json: str):
    """Inventory and parameter counts (depend on the model and adapter knobs only)."""
    from estimator.catalog import resolve_model

    req = EstimateRequest.model_validate_json(req_json)
    entry = resolve_model(req.model)
    inv, model, targets = _build_inventory(entry, req)
    breakdown = _breakdown(model, entry.hf_config(), inv.num_layers)
    return entry, inv, breakdown, targets


def _facts_key(req: EstimateRequest) -> str:
    keep = {"model", "method", "rank", "targets", "dora", "adalora"}
    return EstimateRequest(**{k: v for k, v in req.model_dump().items() if k in keep}).model_dump_json()


def _estimate(req: EstimateRequest) -> Estimate:
    from estimator.catalog import get_gpu

    gpu = get_gpu(req.gpu)
    entry, inv, breakdown, targets = _model_facts(_facts_key(req))
    config = entry.hf_config()
    _check_request(req, config, gpu)
    acts = _activations(config, req, inv.num_layers)
    mem = step_memory(inv, method=req.method, optimizer=req.optimizer, sharding=req.sharding,
                      num_gpus=req.num_gpus, offload=req.offload, activations_bytes=acts.held,
                      forward_peak_rel=acts.forward_peak_rel, backward_peak_rel=acts.backward_peak_rel,
                      grad_accum_steps=req.grad_accum_steps, base_dtype=_base_dtype(req),
                      master_dtype=req.master_dtype, workspace_bytes=cublas_workspace_bytes(gpu.compute_capability))
    card = card_memory(mem.phase_peaks, usable_bytes=gpu.usable_bytes, multi_gpu=req.num_gpus > 1)
    ev = eval_memory(config, resident_bytes=mem.weights_bytes + mem.optimizer_bytes + mem.overhead_bytes
                     + mem.gathered_bytes, eval_batch=req.eval_batch_size or req.batch_size, seq_len=req.seq_len,
                     generate_batch=req.generate_batch_size, max_new_tokens=req.max_new_tokens,
                     value_bytes=_eval_value_bytes(req), attention=req.attention, usable_bytes=gpu.usable_bytes,
                     multi_gpu=req.num_gpus > 1)
    notes = _notes(req, inv, acts, mem, targets)
    notes += _card_notes(req, card, ev)
    trainable = inv.trainable_params
    # compute
    tokens_per_step = req.batch_size * req.seq_len
    if acts.source == "traced" and acts.flops > 0:
        fpt, fsrc = acts.flops / tokens_per_step, "traced"
    else:
        fpt = formula_flops_per_token(breakdown.active, req.method, req.grad_checkpointing)
        fsrc = "formula"
    mfu = req.mfu if req.mfu is not None else gpu.default_mfu
    price = req.price if req.price is not None else gpu.price_usd_per_hour
    compute = compute_info(flops_per_token=fpt, flops_source=fsrc, tokens=req.train_tokens(),
                           num_gpus=req.num_gpus, peak_flops_per_gpu=gpu.flops_for(req.dtype), mfu=mfu,
                           price_usd_per_hour=price)
    if compute.tokens is None:
        notes.append("time and cost need --tokens or --examples with --tokens-per-example")
    adapter_bytes = _adapter_file_bytes(inv, targets) if req.method != "full" else None
    # the runner saves the weights as trained: fp32 master weights, or 16-bit ones for pure 16-bit runs
    checkpoint_bytes = (2 if _pure16(req) else 4) * breakdown.total
    host = host_memory(loaded_bytes=mem.weights_bytes * (req.num_gpus if req.sharding in ("zero3", "fsdp") else 1)
                       if req.method != "qlora" else 0, checkpoint_bytes=2 * breakdown.total,
                       offloaded_bytes=mem.offloaded_bytes, quantized=req.method == "qlora",
                       processes_per_node=min(req.num_gpus, 8))
    storage = StorageInfo(checkpoint_bytes=checkpoint_bytes, adapter_bytes=adapter_bytes,
                          base_bytes=2 * breakdown.total)
    model_info = ModelInfo(
        id=entry.id, display_name=entry.display_name, total_params=breakdown.total, trainable_params=trainable,
        active_params=breakdown.active, breakdown=breakdown, num_layers=inv.num_layers,
        hidden_size=int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0),
        vocab_size=int(getattr(config, "vocab_size", 0) or 0), model_type=str(config.model_type),
        published_params=entry.published_params)
    gpu_info = GPUInfo(id=gpu.id, name=gpu.name, count=req.num_gpus, memory_bytes=gpu.memory_bytes,
                       usable_bytes=gpu.usable_bytes,
                       bf16_support=gpu.bf16_support, price_usd_per_hour=price)
    memory = MemoryBreakdown(
        weights_bytes=mem.weights_bytes, gradients_bytes=mem.gradients_bytes, optimizer_bytes=mem.optimizer_bytes,
        activations_bytes=mem.activations_bytes,
        overhead_bytes=mem.overhead_bytes + card.context_bytes + card.nccl_bytes,
        optimizer_temp_bytes=mem.optimizer_temp_bytes, gathered_bytes=mem.gathered_bytes,
        offloaded_bytes=mem.offloaded_bytes, peak_bytes=card.device_peak_bytes, peak_phase=mem.peak_phase,
        phase_peaks=card.phase_peaks, allocated_phase_peaks=mem.phase_peaks, activation_source=acts.source,
        method_note=_method_note(req),
        allocated_peak_bytes=card.allocated_peak_bytes, reserved_peak_bytes=card.reserved_peak_bytes,
        allocator_cache_bytes=card.allocator_cache_bytes, context_bytes=card.context_bytes,
        nccl_bytes=card.nccl_bytes, usable_bytes=card.usable_bytes, headroom_bytes=card.headroom_bytes,
        margin_bytes=card.margin_bytes)
    return Estimate(request=req, model=model_info, method=req.method, memory=memory, gpu=gpu_info,
                    fits=card.fits, adapter_bytes=adapter_bytes,
                    checkpoint_bytes=checkpoint_bytes, compute=compute, storage=storage, notes=notes,
                    trace_seconds=acts.seconds, eval_memory=ev, eval_fits=ev.fits, host_memory=host)


def _eval_value_bytes(req: EstimateRequest) -> int:
    """Bytes per activation value in the eval and generation: generate() runs without autocast, in the dtype
    the hidden states come out of the weights (16-bit for a 16-bit LoRA base, pure 16-bit and ZeRO/FSDP
    modules; fp32 for fp32 master weights and QLoRA, whose fp32 norms or upcast weights make fp32 hidden
    states)."""
    if req.dtype == "fp32" or req.method == "qlora":
        return 4
    if _pure16(req) or _weights_16bit(req) or _base_dtype(req) != "fp32":
        return 2
    return 4


def _card_notes(req: EstimateRequest, card, ev) -> list[str]:
    from estimator.memory import ALLOCATOR_RESERVED_SHORTFALL, FIT_HEADROOM_FRACTION, GIB

    verdict = "fits" if card.fits else "does not fit"
    notes = [f"what the card holds: allocated peak {card.allocated_peak_bytes / GIB:.2f} GiB (tensors + cuBLAS "
             f"workspaces, torch.cuda.max_memory_allocated); reserved {card.reserved_peak_bytes / GIB:.2f} GiB "
             f"(caching allocator, allocated / (1 - {ALLOCATOR_RESERVED_SHORTFALL:g})); + CUDA context "
             f"{card.context_bytes / GIB:.2f} GiB" + (f" + NCCL {card.nccl_bytes / GIB:.2f} GiB" if card.nccl_bytes
                                                      else "")
             + f" = {card.device_peak_bytes / GIB:.2f} GiB on the card; usable {card.usable_bytes / GIB:.2f} GiB "
             f"(nvidia-smi total), headroom {FIT_HEADROOM_FRACTION:.0%} = {card.headroom_bytes / GIB:.2f} GiB: "
             f"{verdict}, margin {card.margin_bytes / GIB:+.2f} GiB"]
    gen = (f", generation of {req.max_new_tokens} tokens x {req.generate_batch_size} prompts (KV cache "
           f"{ev.kv_cache_bytes / GIB:.2f} GiB)" if req.max_new_tokens else "")
    notes.append(f"eval phase: no-grad forward of {req.eval_batch_size or req.batch_size} x {req.seq_len}{gen} "
                 f"with weights and optimizer states resident: {ev.device_peak_bytes / GIB:.2f} GiB on the card "
                 f"({ev.phase}){'' if ev.fits else ' - DOES NOT FIT: lower the eval or generation batch'}")
    return notes


def _adapter_file_bytes(inv: Inventory, targets: list[str]) -> int:
    """Size of ``adapter_model.safetensors`` as peft saves it (fp32 adapter weights, peft's key names)."""
    from estimator.params import safetensors_file_bytes

    shapes = {}
    for t in inv.tensors:
        if ".lora_" in t.name or t.name.endswith(".ranknum"):
            if t.name.endswith(".ranknum"):
                continue  # AdaLoRA's rank counter is not saved
            shapes["base_model.model." + t.name] = t.shape
    return safetensors_file_bytes(shapes, "fp32", metadata={"format": "pt"})


def _method_note(req: EstimateRequest) -> str:
    if req.method == "qlora":
        compute = {"fp16": "fp16", "bf16": "bf16"}.get(req.dtype, "fp32")
        if _base_dtype(req) != "fp32":
            rest = (f"the QLoRA paper's regime (qlora_regime paper): norms fp32, embeddings, LM head and other "
                    f"weights in {compute}")
        elif req.qlora_regime == "paper" and req.dtype != "fp32":
            rest = (f"other weights fp32 ({req.sharding} keeps peft's upcast: its flat parameters need one dtype "
                    "per unit)")
        else:
            rest = "other weights fp32 (qlora_regime peft-upcast: prepare_model_for_kbit_training)"
        return ("QLoRA: NF4 + double quantization for every Linear but the LM head (bitsandbytes storage), "
                f"{rest}, LoRA weights fp32, compute {compute}")
    if _pure16(req):
        return (f"full: pure {req.master_dtype} (master_dtype {req.master_dtype}): weights, gradients and AdamW "
                f"states in {req.master_dtype}, no fp32 master copy, no autocast"
                + ("; fp16 without loss scaling can underflow gradients: prefer bf16 where the GPU has it"
                   if req.master_dtype == "fp16" else ""))
    if _weights_16bit(req):
        return (f"{req.sharding}: module weights in {req.dtype}, fp32 master weights/gradients with the "
                "optimizer, no autocast")
    if req.dtype == "fp32":
        return f"{req.method}: fp32 weights, fp32 compute"
    if _base_dtype(req) != "fp32":
        return (f"{req.method}: frozen base weights in {req.dtype} (2 B each), adapter weights fp32 with fp32 "
                f"gradients and optimizer states, {req.dtype} autocast (HF Trainer mixed precision)")
    return f"{req.method}: fp32 master weights, {req.dtype} autocast (HF Trainer mixed precision)"


def _moe_notes(req: EstimateRequest, inv: Inventory) -> list[str]:
    """What an MoE estimate assumes (fused 3D experts as transformers 5 builds them; QLoRA rows per expert)."""
    if not any(len(t.shape) == 3 or ".experts." in t.name and t.quantized for t in inv.tensors):
        return []
    notes = ["MoE: routed experts are fused 3D weights (transformers 5), run in the grouped layout whose tensors "
             "are all sized by tokens x top_k, so the traced activations hold for any routing; FLOPs count the "
             "top-k active experts (plus shared experts); presets never adapt routed experts"]
    if req.method == "qlora" and any(len(t.shape) == 3 for t in inv.tensors):
        notes.append("QLoRA on MoE: this architecture's experts (biases, interleaved gate/up or a post-expert norm) "
                     "are not quantized by the runner and stay 3D tensors in the load dtype, counted so here")
    elif req.method == "qlora":
        notes.append("QLoRA on MoE: transformers' 4-bit loader leaves the fused experts unquantized; the runner "
                     "quantizes each expert matrix to NF4 after loading (runner/train/experts.py), counted that way here")
    return notes


def _notes(req: EstimateRequest, inv: Inventory, acts: _Activations, mem: StepMemory, targets: list[str]) -> list[str]:
    from estimator.memory import GIB

    notes = [_method_note(req)]
    if acts.source == "traced":
        notes.append(f"activations traced: one real forward+loss+backward of a {acts.slice_layers}-layer slice on "
                     f"fake tensors, replayed for all {inv.num_layers} layers (batch {req.batch_size}, seq "
                     f"{req.seq_len}, {acts.attention} attention"
                     f"{', gradient checkpointing' if req.grad_checkpointing else ''}); no padding assumed")
        if acts.note:
            notes.append(acts.note)
    else:
        notes.append(acts.note or "activations by formula")
    if (req.method == "full" and req.dtype != "fp32" and not _weights_16bit(req) and not _pure16(req)
            and not req.grad_checkpointing):
        notes.append("autocast keeps the 16-bit copy of every weight that backward needs (about 2 B per Linear "
                     "weight) until backward: it is part of the traced activations; gradient checkpointing avoids "
                     "it (LoRA avoids it by loading its frozen base in 16-bit)")
    opt_notes = {
        "adamw": ("AdamW (adamw_torch, foreach): two moments in the parameters' dtype (8 B per trainable "
                  "parameter in fp32, 4 B in pure 16-bit) + one temporary of that size per parameter during the step"),
        "adamw-8bit": "8-bit AdamW (bitsandbytes): 2 B per trainable parameter + fp32 absmax per 256 values; "
                      "tensors under 4096 values keep fp32 states",
        "paged-adamw-8bit": "paged 8-bit AdamW (bitsandbytes): 8-bit states as adamw-8bit, in paged memory that "
                            "may move to CPU under pressure (counted on the GPU here)",
        "sgd": "SGD as the runner uses it (Trainer 'sgd', momentum 0): no optimizer state; with momentum it "
               "would be 4 B per trainable parameter",
        "adafactor": "Adafactor (transformers, beta1=None): factored fp32 second moment (rows + columns)",
    }
    notes.append(opt_notes[req.optimizer])
    if req.sharding == "ddp":
        notes.append("DDP gradient buckets = one more copy of the gradients (allocated)")
    notes.append("peak of a steady-state step: optimizer states already allocated, gradients freed after the "
                 f"optimizer step; the peak falls at {mem.peak_phase}")
    if req.method != "full":
        notes.append(f"adapter on {', '.join(targets)} (rank {req.rank}, alpha {req.effective_alpha:g}"
                     f"{', DoRA' if req.dora else ''}{', rsLoRA' if req.rslora else ''}"
                     f"{', AdaLoRA' if req.adalora else ''}), lora_dropout {req.dropout:g}")
        from estimator.params import is_mla

        if is_mla(targets):
            notes.append("multi-head latent attention (MLA): the query projection(s) (q_proj, or q_a_proj + q_b_proj) "
                         "and the latent key/value projections (kv_a_proj_with_mqa, kv_b_proj) stand for q and v")
    notes.extend(_moe_notes(req, inv))
    if req.sharding in ("zero3", "fsdp"):
        notes.append(f"{req.sharding}: weights, gradients and states split over {req.num_gpus} GPUs, plus two "
                     "unsharded layers gathered at a time (current + prefetched)")
    if req.offload:
        if req.sharding in ("zero1", "zero2", "zero3", "fsdp"):
            notes.append(f"offload: {mem.offloaded_bytes / GIB:.1f} GiB kept in CPU memory instead of the GPU")
        else:
            notes.append("offload needs --sharding zero1/zero2/zero3/fsdp; ignored")
    if req.grad_accum_steps > 1:
        notes.append(f"gradient accumulation over {req.grad_accum_steps} micro-steps: gradients stay allocated "
                     "during the forward and backward of later micro-steps (counted in both peaks)")
    if req.sharding in ("zero2", "zero3", "fsdp"):
        notes.append("backward peak with sharded gradients: the full-gradient trace minus the gradients other "
                     "GPUs keep (conservative when the peak falls before all gradients exist)")
    return notes


# ------------------------------------------------------------------------------------------ what fits


def _with(req: EstimateRequest, **changes) -> EstimateRequest:
    data = req.model_dump()
    data.update(changes)
    return EstimateRequest(**data)


MAX_GPUS_SEARCHED = 4096  # beyond a few thousand GPUs no single fine-tuning job is realistic


def min_gpus(req: EstimateRequest) -> int | None:
    """Smallest GPU count that fits with ``req.sharding`` (``none``/``ddp``: the best sharding, zero3 then fsdp
    with offload last); None when nothing up to ``MAX_GPUS_SEARCHED`` fits."""
    if estimate(_with(req, num_gpus=1, sharding="none")).fits:
        return 1
    strategies = [req.sharding] if req.sharding in ("zero1", "zero2", "zero3", "fsdp") else ["zero3", "fsdp"]
    best = None
    for strategy in strategies:
        found = _smallest_count(req, strategy)
        if found is not None and (best is None or found < best):
            best = found
    return best


def _smallest_count(req: EstimateRequest, sharding: str) -> int | None:
    def fits(n: int) -> bool:
        return estimate(_with(req, num_gpus=n, sharding=sharding)).fits

    hi = 2
    while hi <= MAX_GPUS_SEARCHED and not fits(hi):
        hi *= 2
    if hi > MAX_GPUS_SEARCHED:
        return None
    lo = hi // 2  # does not fit (or is 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _fits_at(req: EstimateRequest, **changes) -> bool:
    return estimate(_with(req, **changes)).fits


def _confirm(req: EstimateRequest, knob: str, guess: int, step: int, lo: int, hi: int) -> int:
    """Largest value of ``knob`` (a multiple of ``step`` in [lo, hi]) that fits, starting from a model's
    ``guess``: a few real estimates around it, then bisection if the guess was far off."""
    guess = max(lo, min(hi, guess - guess % step))
    if _fits_at(req, **{knob: guess}):
        for _ in range(4):
            if guess + step > hi or not _fits_at(req, **{knob: guess + step}):
                return guess
            guess += step
        good, bad = guess, hi + step
    else:
        for _ in range(4):
            guess -= step
            if guess < lo:
                return 0
            if _fits_at(req, **{knob: guess}):
                return guess
        good, bad = lo - step, guess
        if not _fits_at(req, **{knob: lo}):
            return 0
        good = lo
    while bad - good > step:
        mid = good + ((bad - good) // step // 2) * step
        if _fits_at(req, **{knob: mid}):
            good = mid
        else:
            bad = mid
    return good


def _solve(points: list[tuple[int, dict[str, int]]], limit: int, degree: int) -> float:
    """Largest x with every phase's fitted peak(x) <= limit; phases fitted exactly through the points
    (degree 1: a line through two points; degree 2: a parabola through three)."""
    best = float("inf")
    for phase in points[0][1]:
        xs = [float(x) for x, _ in points]
        ys = [float(p[phase]) for _, p in points]
        if degree == 1:
            slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
            x = float("inf") if slope <= 0 else xs[0] + (limit - ys[0]) / slope
        else:
            (x0, x1, x2), (y0, y1, y2) = xs, ys
            c = ((y2 - y0) / (x2 - x0) - (y1 - y0) / (x1 - x0)) / (x2 - x1)
            b = (y1 - y0) / (x1 - x0) - c * (x0 + x1)
            a = y0 - b * x0 - c * x0 * x0
            if abs(c) < 1e-12:
                x = float("inf") if b <= 0 else (limit - a) / b
            else:
                disc = b * b - 4 * c * (a - limit)
                x = float("inf") if disc < 0 and c < 0 else (-b + disc ** 0.5) / (2 * c) if disc >= 0 else 0.0
        best = min(best, x)
    return best


def max_batch_size(req: EstimateRequest) -> int:
    """Largest micro-batch that fits ``req.gpu`` (0 if batch 1 does not fit).

    Activations are linear in the batch at a fixed length: estimates at batch 1 and 2 give each phase's line,
    the crossing with the GPU memory is the guess, and real estimates around it confirm the answer.
    """
    from estimator.request import MAX_BATCH

    e1 = estimate(_with(req, batch_size=1))
    if not e1.fits:
        return 0
    e2 = estimate(_with(req, batch_size=2))
    if not e2.fits:
        return 1
    x = _solve([(1, e1.memory.phase_peaks), (2, e2.memory.phase_peaks)], fit_limit_bytes(e1.gpu.usable_bytes), 1)
    guess = MAX_BATCH if x == float("inf") else int(min(MAX_BATCH, x))
    return _confirm(req, "batch_size", max(2, guess), 1, 1, MAX_BATCH)


def max_seq_len(req: EstimateRequest, multiple_of: int = 64) -> int:
    """Longest sequence (a multiple of ``multiple_of``, up to the model's context) that fits ``req.gpu``;
    0 if ``multiple_of`` tokens do not fit. Memory is at most quadratic in the length (eager attention), so
    three estimates give each phase's parabola; real estimates around its crossing confirm the answer."""
    from estimator.catalog import resolve_model

    config = resolve_model(req.model).hf_config()
    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 131072
    hi = max(multiple_of, (min(int(ctx), 1_048_576) // multiple_of) * multiple_of)
    if not _fits_at(req, seq_len=multiple_of):
        return 0
    if _fits_at(req, seq_len=hi):
        return hi
    xs = sorted({max(multiple_of, min(hi, v)) for v in (hi // 8, hi // 4, hi // 2)})
    if len(xs) < 3:
        xs = [multiple_of, max(2 * multiple_of, hi // 2), hi]
    points = [(x, estimate(_with(req, seq_len=x)).memory.phase_peaks) for x in xs[:3]]
    limit = fit_limit_bytes(estimate(_with(req, seq_len=multiple_of)).gpu.usable_bytes)
    x = _solve(points, limit, 2)
    guess = hi if x == float("inf") else int(max(multiple_of, min(hi, x)))
    return _confirm(req, "seq_len", guess, multiple_of, multiple_of, hi)


def fitting_gpus(req: EstimateRequest) -> list[tuple[str, Estimate]]:
    """Every catalog GPU with the estimate of ``req`` on it (same count and sharding), in catalog order.

    A GPU the request cannot run on (bf16 on a card without it) gets the fp16 estimate instead.
    """
    from estimator.catalog import list_gpus

    out = []
    for gpu in list_gpus():
        r = _with(req, gpu=gpu.id)
        if r.dtype == "bf16" and not gpu.bf16_support:
            r = _with(r, dtype="fp16", master_dtype="fp16" if r.master_dtype != "fp32" else "fp32")
        out.append((gpu.id, estimate(r)))
    return out


def storage_for_tasks(est: Estimate, n_tasks: int) -> dict:
    """Bytes for ``n_tasks`` fine-tuned tasks: N full checkpoints vs one 16-bit base + N adapters."""
    if n_tasks < 1:
        raise EstimatorError(f"n_tasks must be at least 1 (got {n_tasks})", field="n_tasks")
    full = n_tasks * est.checkpoint_bytes
    adapters = None
    if est.adapter_bytes is not None:
        adapters = est.storage.base_bytes + n_tasks * est.adapter_bytes
    return {"n_tasks": n_tasks, "full_checkpoints_bytes": full, "base_plus_adapters_bytes": adapters,
            "checkpoint_bytes": est.checkpoint_bytes, "adapter_bytes": est.adapter_bytes,
            "base_bytes": est.storage.base_bytes,
            "ratio": (full / adapters) if adapters else None}


def clear_caches() -> None:
    """Forget cached estimates (not the disk traces)."""
    _estimate_cached.cache_clear()
    _model_facts.cache_clear()

