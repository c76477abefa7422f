"""The dtypes a request trains in, as the runner loads and trains the model (``runner/train/recipe.py``).

Shared by the trace settings, the memory figures and the notes of an estimate.
"""

from __future__ import annotations

from estimator.request import EstimateRequest


def weights_16bit(req: EstimateRequest) -> bool:
    """ZeRO/FSDP keep the module in 16-bit (their own fp32 master copy), no autocast."""
    return req.sharding in ("zero1", "zero2", "zero3", "fsdp") and req.method != "qlora" and req.dtype != "fp32"


def pure16(req: EstimateRequest) -> bool:
    """Pure 16-bit full fine-tuning: the model loaded in bf16/fp16, trained without autocast or master copy."""
    return req.method == "full" and req.master_dtype != "fp32"


def base_dtype(req: EstimateRequest) -> str:
    """dtype of the frozen base weights: LoRA bf16/fp16 runs on one GPU, DDP or FSDP load the base in that dtype
    (``runner/train/recipe.py`` ``lora_base_dtype``); full fine-tuning keeps fp32 master weights, QLoRA stores NF4,
    and ZeRO/FSDP cast the module themselves (``weights_16bit``)."""
    if req.method == "lora" and req.dtype != "fp32" and req.sharding in ("none", "ddp", "fsdp"):
        # FSDP2 shards a frozen parameter in its load dtype and asks only the trainable parameters of a group
        # to share one dtype (torch FSDPParamGroup._init_mp_dtypes; accelerate upcasts requires_grad ones only),
        # so the runner loads the FSDP LoRA base in 16-bit too (tests/test_fsdp_memory.py, a real gloo step)
        return req.dtype
    if (req.method == "qlora" and req.qlora_regime == "paper" and req.dtype != "fp32"
            and req.sharding in ("none", "ddp")):
        return req.dtype  # the QLoRA paper's regime: non-quantized weights in the compute dtype, norms fp32
    return "fp32"


def eval_value_bytes(req: EstimateRequest) -> int:
    """Bytes per activation value in the eval and generation: generate() runs without autocast, in the dtype
    the hidden states come out of the weights (16-bit for a 16-bit LoRA base, pure 16-bit and ZeRO/FSDP
    modules; fp32 for fp32 master weights and QLoRA, whose fp32 norms or upcast weights make fp32 hidden
    states)."""
    if req.dtype == "fp32" or req.method == "qlora":
        return 4
    if pure16(req) or weights_16bit(req) or base_dtype(req) != "fp32":
        return 2
    return 4
