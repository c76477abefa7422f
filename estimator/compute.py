"""FLOPs, time and cost of a training run.

FLOPs per token come from the traced step (``torch.utils.flop_counter`` formulas on every matmul and
attention op of the forward, backward and recompute, scaled to all layers); when tracing failed, from the
cited rules: ``6 * P`` per token for full fine-tuning, ``4 * P`` for LoRA/QLoRA (no weight gradients of frozen
weights), ``+ 2 * P`` with full recompute (EleutherAI "Transformer Math 101"; LoRA paper's 25% speed-up).

Time = FLOPs / (GPUs x peak dense FLOP/s of the compute dtype x utilisation). The utilisation applies to the
FLOPs actually executed (recompute included), so gradient checkpointing costs time here as on the GPU.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

SECONDS_PER_HOUR = 3600.0
# Training FLOPs per parameter per token (EleutherAI "Transformer Math 101"; PaLM appendix B):
FULL_FLOPS_PER_PARAM = 6  # forward 2 + backward 4 (input and weight gradients)
ADAPTER_FLOPS_PER_PARAM = 4  # forward 2 + input gradients 2; frozen weights get no weight gradient
RECOMPUTE_FLOPS_PER_PARAM = 2  # one more forward with full activation checkpointing


class ComputeInfo(BaseModel):
    """Time and cost; the token-dependent fields are None when no tokens were given."""

    flops_per_token: float = Field(description="FLOPs per trained token (forward + backward + recompute)")
    flops_source: str = Field(description="traced (FlopCounter formulas) or formula (6PD / 4PD)")
    tokens: int | None = Field(None, description="tokens trained (all epochs)")
    flops: float | None = Field(None, description="FLOPs of the whole run")
    mfu: float = Field(description="utilisation of peak FLOP/s assumed")
    peak_flops_per_gpu: float = Field(description="dense peak FLOP/s of one GPU in the compute dtype")
    throughput_tokens_per_s: float = Field(description="tokens per second over all GPUs")
    hours: float | None = Field(None, description="wall-clock hours")
    gpu_hours: float | None = None
    price_usd_per_hour: float = Field(description="USD per GPU-hour")
    cost_usd: float | None = None


def formula_flops_per_token(params: int, method: str, grad_checkpointing: bool) -> float:
    """FLOPs per token by the cited rules (``params`` = parameters used per token; MoE: active)."""
    per = FULL_FLOPS_PER_PARAM if method == "full" else ADAPTER_FLOPS_PER_PARAM
    if grad_checkpointing:
        per += RECOMPUTE_FLOPS_PER_PARAM
    return float(per * params)


def compute_info(*, flops_per_token: float, flops_source: str, tokens: int | None, num_gpus: int,
                 peak_flops_per_gpu: float, mfu: float, price_usd_per_hour: float) -> ComputeInfo:
    """Hours, GPU-hours and cost for ``tokens`` at ``mfu`` of peak on ``num_gpus`` GPUs."""
    throughput_flops = num_gpus * peak_flops_per_gpu * mfu
    tokens_per_s = throughput_flops / flops_per_token if flops_per_token > 0 else 0.0
    info = dict(flops_per_token=flops_per_token, flops_source=flops_source, tokens=tokens, mfu=mfu,
                peak_flops_per_gpu=peak_flops_per_gpu, throughput_tokens_per_s=tokens_per_s,
                price_usd_per_hour=price_usd_per_hour)
    if tokens is not None and throughput_flops > 0:
        flops = flops_per_token * tokens
        hours = flops / throughput_flops / SECONDS_PER_HOUR
        info.update(flops=flops, hours=hours, gpu_hours=hours * num_gpus,
                    cost_usd=hours * num_gpus * price_usd_per_hour)
    return ComputeInfo(**info)
