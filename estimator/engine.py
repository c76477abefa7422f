"""``estimate(request) -> Estimate``: parameters, per-GPU memory of one training step, time, cost, storage.

Pure computation (no printing): ``estimator/cli.py`` and the app pages format the result. Every assumption
is written into ``Estimate.notes``. Results are cached per request (in memory), traces also on disk.
The parts: ``inventory`` (the tensors as trained), the traced activations (``trace``), ``memory`` (the step's
bytes), ``notes``; the searches over knobs (``min_gpus``, ``max_batch_size``...) are in ``search``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from estimator.compute import compute_info, formula_flops_per_token
from estimator.errors import EstimatorError, TraceError
from estimator.experts import checkpoint_layout
from estimator.inventory import adapter_file_bytes, build_inventory, param_breakdown
from estimator.memory import (card_memory, cublas_workspace_bytes, eval_memory, formula_activations, host_memory,
                              legacy_rope_cache_bytes, moe_qlora_load_peak_bytes, step_memory,
                              unsharded_qlora_load_peak_bytes)
from estimator.notes import card_notes, load_note, method_note, step_notes
from estimator.params import check_experts_knobs
from estimator.precision import base_dtype, eval_value_bytes, pure16, weights_16bit
from estimator.request import EXPERTS_PRESET, EstimateRequest
from estimator.result import Activations, Estimate, GPUInfo, MemoryBreakdown, ModelInfo, StorageInfo
from estimator.slicing import layer_kinds


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
    if req.targets == EXPERTS_PRESET and req.method != "full":
        check_experts_knobs(method=req.method, dora=req.dora, adalora=req.adalora, dropout=req.dropout)
    if req.method == "qlora" and req.sharding in ("zero1", "zero2", "zero3") and req.num_gpus > 1:
        pass  # supported: adapters are what the optimizer sees; frozen NF4 weights are sharded by ZeRO-3


class Stack(NamedTuple):
    """The software stack a step runs on, where it is not the runner's (``estimator.validation`` sets it from a
    published row): the causal-LM loss of its transformers (``TraceSettings.loss_impl``), reentrant gradient
    checkpointing, bitsandbytes < 0.43.2 keeping its input (``TraceSettings``), and transformers <= 4.40's per-layer
    rotary caches (``memory.legacy_rope_cache_bytes``). The default is the runner's."""

    loss_impl: str = "current"
    checkpoint_reentrant: bool = False
    bnb_keeps_input: bool = False
    legacy_rope_cache: bool = False


RUNNER_STACK = Stack()


def trace_settings(req: EstimateRequest, batch_size: int | None = None, seq_len: int | None = None,
                   stack: Stack = RUNNER_STACK):
    """The ``TraceSettings`` of ``req`` (the trace's cache key); ``batch_size``/``seq_len`` override the request's;
    ``stack``: an older stack than the runner's."""
    from estimator.trace import TraceSettings

    targets = req.targets if isinstance(req.targets, str) else tuple(req.targets)
    return TraceSettings(method=req.method, rank=req.rank, alpha=req.effective_alpha, targets=targets,
                         dora=req.dora, rslora=req.rslora, adalora=req.adalora, dropout=req.dropout,
                         dtype=req.dtype, weights_16bit=weights_16bit(req) or pure16(req),
                         base_dtype=base_dtype(req),
                         batch_size=batch_size or req.batch_size, seq_len=seq_len or req.seq_len,
                         grad_checkpointing=req.grad_checkpointing, attention=req.attention,
                         loss_impl=stack.loss_impl,
                         checkpoint_reentrant=stack.checkpoint_reentrant and req.grad_checkpointing,
                         bnb_keeps_input=stack.bnb_keeps_input and req.method == "qlora")


def _activations(config, req: EstimateRequest, num_layers: int, stack: Stack = RUNNER_STACK) -> Activations:
    """Traced activations (or the formula, with the reason) for this request's knobs."""
    from estimator.trace import extrapolate, trace_slice

    settings = trace_settings(req, stack=stack)
    note = None
    if stack.loss_impl != "current":
        note = ("loss traced as transformers < 4.49 computes it: an fp32 copy of the shifted logits alive through "
                "the cross-entropy" + (", the logits upcast to fp32 in the forward (<= 4.45)"
                                       if stack.loss_impl == "upcast-in-forward" else ""))
    if settings.attention == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        # transformers refuses sdpa with attention-logit softcapping (Gemma-2): the run has to use eager
        settings = settings.model_copy(update={"attention": "eager"})
        note = "; ".join(filter(None, [note, (
            f"{config.model_type} caps attention logits (attn_logit_softcapping), which sdpa does not "
            "support: traced with eager attention, as the run must use")]))
    try:
        trace = trace_slice(config, settings)
        ex = extrapolate(trace, num_layers, layer_kinds(config))  # layer kinds: attention type, dense/MoE
        return Activations(held=ex.activations_bytes, forward_peak_rel=ex.forward_peak_rel_bytes,
                            backward_peak_rel=ex.backward_peak_rel_bytes, flops=ex.flops, source="traced",
                            seconds=trace.seconds, note=note, slice_layers=trace.slice_layers,
                            attention=settings.attention)
    except TraceError as exc:
        b, s = settings.batch_size, settings.seq_len
        held, fwd, bwd = formula_activations(config, batch_size=b, seq_len=s, attention=settings.attention,
                                             grad_checkpointing=req.grad_checkpointing, dtype=req.dtype)
        moe = " (MoE: expert activations depend on the routing and are not in the formula)" if getattr(
            config, "num_local_experts", None) or getattr(config, "num_experts", None) else ""
        return Activations(held=held, forward_peak_rel=fwd, backward_peak_rel=bwd, flops=0.0, source="formula",
                            note=f"activations by formula (Korthikanti et al. 2022 + logits): the trace failed "
                                 f"for this architecture ({str(exc)[:200]}){moe}", attention=settings.attention)


def estimate(req: EstimateRequest, *, loss_impl: str = "current", checkpoint_reentrant: bool = False,
             bnb_keeps_input: bool = False, legacy_rope_cache: bool = False) -> Estimate:
    """The estimate for ``req`` (cached: the same request returns the same object in microseconds).

    ``loss_impl`` "shifted-copy" / "upcast-in-forward" trace the loss as transformers 4.46-4.48 / <= 4.45 ran it
    (``estimator.validation`` uses them for published runs of those versions); the runner's transformers is the
    installed one: "current". ``legacy_rope_cache``: the model also holds transformers <= 4.40's per-layer rotary
    caches (``memory.legacy_rope_cache_bytes``), for published runs of those versions."""
    if not isinstance(req, EstimateRequest):
        raise EstimatorError("request: pass an EstimateRequest", field="request")
    if loss_impl not in ("current", "shifted-copy", "upcast-in-forward"):
        raise EstimatorError(f"loss_impl: must be 'current', 'shifted-copy' or 'upcast-in-forward' (got "
                             f"{loss_impl!r})", field="loss_impl")
    return _estimate_cached(req.model_dump_json(), Stack(loss_impl, checkpoint_reentrant, bnb_keeps_input,
                                                         legacy_rope_cache))


@functools.lru_cache(maxsize=512)
def _estimate_cached(req_json: str, stack: Stack = RUNNER_STACK) -> Estimate:
    return _estimate(EstimateRequest.model_validate_json(req_json), stack)


@functools.lru_cache(maxsize=64)
def _model_facts(req_json: str):
    """Inventory and parameter counts (depend on the model and adapter knobs only)."""
    from estimator.catalog import resolve_model

    req = EstimateRequest.model_validate_json(req_json)
    entry = resolve_model(req.model)
    inv, model, targets = build_inventory(entry, req)
    breakdown = param_breakdown(model, entry.hf_config(), inv.num_layers)
    return entry, inv, breakdown, targets


def _facts_key(req: EstimateRequest) -> str:
    keep = {"model", "method", "rank", "targets", "dora", "adalora"}
    return EstimateRequest(**{k: v for k, v in req.model_dump().items() if k in keep}).model_dump_json()


def _estimate(req: EstimateRequest, stack: Stack = RUNNER_STACK) -> Estimate:
    from estimator.catalog import get_gpu

    gpu = get_gpu(req.gpu)
    entry, inv, breakdown, targets = _model_facts(_facts_key(req))
    config = entry.hf_config()
    if stack.legacy_rope_cache:
        # built at load in the load dtype: 16-bit for LoRA, QLoRA (peft's upcast casts parameters, not buffers)
        # and pure 16-bit full fine-tuning; fp32 when full fine-tuning keeps fp32 master weights
        load_bytes = 4 if req.dtype == "fp32" or (req.method == "full" and not pure16(req)) else 2
        inv = inv.model_copy(update={"buffer_bytes": inv.buffer_bytes + legacy_rope_cache_bytes(config, load_bytes)})
    _check_request(req, config, gpu)
    acts = _activations(config, req, inv.num_layers, stack)
    mem = step_memory(inv, method=req.method, optimizer=req.optimizer, sharding=req.sharding,
                      num_gpus=req.num_gpus, offload=req.offload, activations_bytes=acts.held,
                      forward_peak_rel=acts.forward_peak_rel, backward_peak_rel=acts.backward_peak_rel,
                      grad_accum_steps=req.grad_accum_steps, base_dtype=base_dtype(req),
                      master_dtype=req.master_dtype, workspace_bytes=cublas_workspace_bytes(gpu.compute_capability),
                      compute_bytes=4 if req.dtype == "fp32" else 2)
    card = card_memory(mem.phase_peaks, usable_bytes=gpu.usable_bytes, multi_gpu=req.num_gpus > 1)
    ev = eval_memory(config, resident_bytes=mem.weights_bytes + mem.optimizer_bytes + mem.overhead_bytes
                     + mem.gathered_bytes, eval_batch=req.eval_batch_size or req.batch_size, seq_len=req.seq_len,
                     generate_batch=req.generate_batch_size, max_new_tokens=req.max_new_tokens,
                     value_bytes=eval_value_bytes(req), attention=req.attention, usable_bytes=gpu.usable_bytes,
                     multi_gpu=req.num_gpus > 1)
    # QLoRA MoE: the runner quantizes each fused experts tensor as it loads; one layer's build is the load's peak
    load_alloc, load_reason = 0, ""
    if req.method == "qlora":
        load_bytes = 2 if base_dtype(req) != "fp32" else 4
        load_alloc = moe_qlora_load_peak_bytes(inv, load_bytes, checkpoint_layout(config.model_type))
        load_reason = "moe" if load_alloc else ""
        if req.sharding in ("fsdp", "zero3") and req.num_gpus > 1:
            # every rank loads the whole 4-bit model onto its GPU before FSDP / ZeRO-3 shard it
            whole = unsharded_qlora_load_peak_bytes(inv, load_bytes)
            if whole > load_alloc:
                load_alloc, load_reason = whole, "unsharded"
    load_card = (card_memory({"load": load_alloc}, usable_bytes=gpu.usable_bytes, multi_gpu=req.num_gpus > 1)
                 if load_alloc else None)
    notes = step_notes(req, inv, acts, mem, targets)
    notes += card_notes(req, card, ev)
    if load_card is not None:
        notes.append(load_note(load_card, load_reason))
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
    adapter_bytes = adapter_file_bytes(inv, targets) if req.method != "full" else None
    # the runner saves the weights as trained: fp32 master weights, or 16-bit ones for pure 16-bit runs
    checkpoint_bytes = (2 if pure16(req) else 4) * breakdown.total
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
        method_note=method_note(req),
        allocated_peak_bytes=card.allocated_peak_bytes, reserved_peak_bytes=card.reserved_peak_bytes,
        allocator_cache_bytes=card.allocator_cache_bytes, context_bytes=card.context_bytes,
        nccl_bytes=card.nccl_bytes, usable_bytes=card.usable_bytes, headroom_bytes=card.headroom_bytes,
        margin_bytes=card.margin_bytes, load_peak_bytes=load_alloc, load_reason=load_reason,
        load_device_peak_bytes=load_card.device_peak_bytes if load_card else 0)
    load_fits = load_card.fits if load_card else True
    return Estimate(request=req, model=model_info, method=req.method, memory=memory, gpu=gpu_info,
                    fits=card.fits and load_fits, load_fits=load_fits, adapter_bytes=adapter_bytes,
                    checkpoint_bytes=checkpoint_bytes, compute=compute, storage=storage, notes=notes,
                    trace_seconds=acts.seconds, eval_memory=ev, eval_fits=ev.fits, host_memory=host)


def clear_caches() -> None:
    """Forget cached estimates (not the disk traces)."""
    _estimate_cached.cache_clear()
    _model_facts.cache_clear()
