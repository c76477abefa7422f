"""The notes of an estimate: every assumption behind its figures, as sentences (``Estimate.notes``)."""

from __future__ import annotations

from estimator.memory import ALLOCATOR_RESERVED_SHORTFALL, FIT_HEADROOM_FRACTION, GIB, Inventory, StepMemory
from estimator.precision import base_dtype, pure16, weights_16bit
from estimator.request import EstimateRequest
from estimator.result import Activations


def method_note(req: EstimateRequest) -> str:
    if req.method == "qlora":
        compute = {"fp16": "fp16", "bf16": "bf16"}.get(req.dtype, "fp32")
        if base_dtype(req) != "fp32":
            rest = (f"the QLoRA paper's regime (qlora_regime paper): norms fp32, embeddings, LM head and other "
                    f"weights in {compute}")
        elif req.qlora_regime == "paper" and req.dtype != "fp32":
            rest = (f"other weights fp32 ({req.sharding} keeps peft's upcast: its flat parameters need one dtype "
                    "per unit)")
        else:
            rest = "other weights fp32 (qlora_regime peft-upcast: prepare_model_for_kbit_training)"
        return ("QLoRA: NF4 + double quantization for every Linear but the LM head (bitsandbytes storage), "
                f"{rest}, LoRA weights fp32, compute {compute}")
    if pure16(req):
        return (f"full: pure {req.master_dtype} (master_dtype {req.master_dtype}): weights, gradients and AdamW "
                f"states in {req.master_dtype}, no fp32 master copy, no autocast"
                + ("; fp16 without loss scaling can underflow gradients: prefer bf16 where the GPU has it"
                   if req.master_dtype == "fp16" else ""))
    if weights_16bit(req) and req.sharding == "fsdp":
        trained = "fp32 shards of the trainable weights" if req.method == "full" else "fp32 adapter shards"
        base = "" if req.method == "full" else f", frozen base shards in {req.dtype}"
        return (f"fsdp: {trained} (accelerate upcasts trainable parameters when mixed precision is on){base}, "
                f"gathered in {req.dtype} (MixedPrecisionPolicy param_dtype); fp32 gradient shards")
    if weights_16bit(req):
        return (f"{req.sharding}: module weights in {req.dtype}, fp32 master weights/gradients with the "
                "optimizer, no autocast")
    if req.dtype == "fp32":
        return f"{req.method}: fp32 weights, fp32 compute"
    if base_dtype(req) != "fp32":
        return (f"{req.method}: frozen base weights in {req.dtype} (2 B each), adapter weights fp32 with fp32 "
                f"gradients and optimizer states, {req.dtype} autocast (HF Trainer mixed precision)")
    return f"{req.method}: fp32 master weights, {req.dtype} autocast (HF Trainer mixed precision)"


def _moe_notes(req: EstimateRequest, inv: Inventory) -> list[str]:
    """What an MoE estimate assumes (fused 3D experts as transformers 5 builds them; QLoRA rows per expert)."""
    if not any(len(t.shape) == 3 or ".experts." in t.name and t.quantized for t in inv.tensors):
        return []
    notes = ["MoE: routed experts are fused 3D weights (transformers 5), run in the grouped layout whose tensors "
             "are all sized by tokens x top_k, so the traced activations hold for any routing; FLOPs count the "
             "top-k active experts (plus shared experts); "
             + ("the routed experts are adapted too (all-linear+experts: peft target_parameters, one rank-r LoRA "
                "per expert and matrix, its delta weight built at every forward)"
                if req.targets == "all-linear+experts" else
                "presets other than all-linear+experts never adapt routed experts")]
    if req.method == "qlora" and any(len(t.shape) == 3 for t in inv.tensors):
        notes.append("QLoRA on MoE: this architecture's experts (biases, interleaved gate/up or a post-expert norm) "
                     "are not quantized by the runner and stay 3D tensors in the load dtype, counted so here")
    elif req.method == "qlora":
        notes.append("QLoRA on MoE: transformers' 4-bit loader leaves the fused experts unquantized; the runner "
                     "quantizes each expert matrix to NF4 as it loads (runner/train/experts.py), counted that way here")
    return notes


def step_notes(req: EstimateRequest, inv: Inventory, acts: Activations, mem: StepMemory,
               targets: list[str]) -> list[str]:
    """What the training-step figures assume: precision, activations, optimizer, sharding, adapter, MoE."""
    notes = [method_note(req)]
    if acts.source == "traced":
        notes.append(f"activations traced: one real forward+loss+backward of a {acts.slice_layers}-layer slice on "
                     f"fake tensors, replayed for all {inv.num_layers} layers (batch {req.batch_size}, seq "
                     f"{req.seq_len}, {acts.attention} attention"
                     f"{', gradient checkpointing' if req.grad_checkpointing else ''}); no padding assumed")
        if acts.note:
            notes.append(acts.note)
    else:
        notes.append(acts.note or "activations by formula")
    if (req.method == "full" and req.dtype != "fp32" and not weights_16bit(req) and not pure16(req)
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
        tail = (", the tail unit (final norm + LM head) kept gathered from the loss into backward, and one "
                "layer's unsharded gradients in backward (reduce-scatter)" if req.sharding == "fsdp" else "")
        notes.append(f"{req.sharding}: weights, gradients and states split over {req.num_gpus} GPUs, plus two "
                     f"unsharded layers gathered at a time (current + prefetched){tail}; nothing gathered at the "
                     "optimizer step")
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



def card_notes(req: EstimateRequest, card, ev) -> list[str]:
    """What the card holds at the peak and whether the eval phase fits."""
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


#: Why loading peaks, per ``MemoryBreakdown.load_reason``: the one wording of the note, the Estimate page and the advisor.
LOAD_WHY = {
    "unsharded": "each GPU loads the whole 4-bit model before FSDP / ZeRO-3 shard it: transformers' rank-0 "
                 "loading skips quantized models",
    "moe": "the runner quantizes each layer's fused MoE experts as they load, and the last layer's, built in 16 "
           "bits beside the 4-bit model, is the peak",
}


def load_note(load_card, reason: str = "moe") -> str:
    """QLoRA's load peak (``memory.moe_qlora_load_peak_bytes`` / ``unsharded_qlora_load_peak_bytes``) and whether
    it fits."""
    verdict = "fits" if load_card.fits else "does not fit: the run fails while loading, before training starts"
    return (f"loading: {load_card.allocated_peak_bytes / GIB:.2f} GiB allocated at the load peak "
            f"({load_card.device_peak_bytes / GIB:.2f} GiB on the card): {LOAD_WHY[reason]}; {verdict} "
            f"(margin {load_card.margin_bytes / GIB:+.2f} GiB)")