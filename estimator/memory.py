"""Memory of one steady-state training step, per GPU, as the runner runs it.

The regime counted (``runner/recipe.py`` + HF Trainer defaults, read from their source):

* **full, one GPU or DDP**: the model is loaded in fp32 (master weights); ``bf16``/``fp16`` runs use
  Trainer's autocast (mixed precision), so every weight is cast to 16-bit inside the forward pass and those
  casts that backward needs stay alive as activations (the trace sees them). Gradients are fp32 (the dtype of
  the parameters).
* **LoRA (rsLoRA, DoRA, LoRA+, AdaLoRA), one GPU or DDP**: ``bf16``/``fp16`` runs load the frozen base in that
  16-bit dtype (2 B per weight, ``runner/recipe.py`` ``lora_base_dtype``; buffers such as RoPE ``inv_freq``
  stay fp32 as transformers creates them); peft keeps every adapter tensor in fp32 (4 B,
  ``autocast_adapter_dtype=True``), so gradients and optimizer states are fp32 and of the adapters only. The
  Trainer still autocasts forward and loss (only the fp32 adapter weights get cast copies). fp32 runs: fp32
  base, no autocast.
* **QLoRA**: every Linear but the LM head is NF4 with double quantization (bitsandbytes' exact storage, see
  ``trace.nf4_linear_bytes``); ``prepare_model_for_kbit_training`` leaves every other weight (embeddings, norms,
  LM head) in fp32 (the runner loads them in fp32 already); compute dtype bf16 (fp16 when the run is fp16).
* **ZeRO-1/2/3 (DeepSpeed)**: DeepSpeed keeps the module in bf16/fp16 (2 B per weight) with fp32 master
  weights, fp32 gradient partitions and the optimizer moments in the optimizer (DeepSpeed's own count:
  "18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states", ``stage_1_and_2.py``); activations are
  traced with 16-bit weights and no autocast.
* **FSDP full-shard** (Trainer/accelerate): fp32 flat parameters sharded, gathered one layer at a time in
  bf16 (``MixedPrecision(param_dtype=bf16)``), fp32 gradient and optimizer shards; activations as ZeRO.
* **Optimizer states** (GPU bytes): ``adamw`` = ``adamw_torch`` (foreach on CUDA; the step ``step`` counters
  are CPU scalars): two fp32 moments, 8 B per trainable parameter, plus one fp32 temporary per parameter at
  the step (``torch._foreach_sqrt`` in ``_multi_tensor_adamw``). ``adamw-8bit`` / ``paged-adamw-8bit``
  (bitsandbytes ``AdamW8bit``): two uint8 states + one fp32 absmax per 256 values each, for tensors with at
  least 4096 values (``min_8bit_size``); smaller tensors keep fp32 states; plus the two shared 256-entry fp32
  quantization maps; paged states may be evicted to CPU under pressure. ``sgd`` = Trainer's ``sgd``
  (``torch.optim.SGD`` with momentum 0: no state). ``adafactor`` (transformers, ``beta1=None``): factored second
  moment (row + column fp32 vectors) for tensors with 2+ dims, a full fp32 moment otherwise.
* **Overhead**: CUDA context + allocator reserve, ``CUDA_OVERHEAD_BYTES``; multi-GPU adds
  ``NCCL_BUFFER_BYTES``; DDP adds its gradient buckets (``gradient_as_bucket_view=False``, PyTorch default).
* **Step**: optimizer states already allocated, gradients freed after the step (``zero_grad(set_to_none)``).
  The peak is the largest of forward/loss end, backward and optimizer step.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from estimator.trace import nf4_linear_bytes

GIB = 1024**3
MIB = 1024**2

# CUDA context and the caching allocator's reserve: "about 0.5-1 GiB per process" (Stas Bekman,
# ml-engineering, training/performance); we take the upper end so that "fits" errs on the safe side.
CUDA_OVERHEAD_BYTES = 1 * GIB
# NCCL communicator buffers in multi-GPU runs: NCCL_BUFFSIZE defaults to 4 MiB per channel and peer
# (NCCL environment variables docs); with the usual 16-32 channels x send/recv this is a few hundred MiB.
NCCL_BUFFER_BYTES = 512 * MIB
# bitsandbytes 8-bit optimizers: tensors smaller than min_8bit_size keep 32-bit states; block size 256
# (bitsandbytes optim/optimizer.py Optimizer8bit, ``min_8bit_size=4096``, blockwise quantization).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_QMAP_BYTES = 2 * 256 * 4  # qmap1 + qmap2: 256-entry fp32 dynamic maps, shared by every parameter
# AdamW (foreach): torch._foreach_sqrt(exp_avg_sqs) makes one fp32 temporary per trainable value.
ADAMW_STEP_TEMP_BYTES_PER_PARAM = 4
# transformers Adafactor.step, per parameter: ``update = grad**2 + eps`` then ``p.add_(-update)``: two fp32
# full-size temporaries of the parameter being updated (the largest one sets the peak).
ADAFACTOR_TEMP_COPIES = 2
# FSDP keeps the current layer and prefetches the next one (BackwardPrefetch.BACKWARD_PRE, the default);
# DeepSpeed ZeRO-3 prefetches likewise: two layers unsharded at a time.
GATHERED_LAYERS = 2

Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp"]


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    shape: tuple[int, ...]
    trainable: bool
    quantized: bool = False  # stored as NF4 by bitsandbytes (QLoRA)
    layer: int | None = None  # decoder layer index, None outside the layers
    adapter: bool = False  # a peft adapter tensor (kept fp32 by peft whatever the base dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class Inventory(BaseModel):
    """Every parameter of the model as trained (base + adapter), and the buffers' bytes."""

    tensors: list[TensorInfo]
    buffer_bytes: int = Field(description="bytes of registered buffers (e.g. rotary inv_freq), as stored")
    num_layers: int

    def trainable(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.trainable]

    @property
    def trainable_params(self) -> int:
        return sum(t.numel for t in self.tensors if t.trainable)


class StepMemory(BaseModel):
    """Per-GPU bytes of one steady-state step."""

    weights_bytes: int = Field(description="weights resident on the GPU (adapters included)")
    gradients_bytes: int = Field(description="gradients alive at the optimizer step")
    optimizer_bytes: int = Field(description="optimizer states resident on the GPU")
    activations_bytes: int = Field(description="held at the end of forward + loss")
    overhead_bytes: int = Field(description="CUDA context/allocator (+ NCCL, DDP buckets when multi-GPU)")
    optimizer_temp_bytes: int = Field(description="temporaries of the optimizer step")
    gathered_bytes: int = Field(0, description="ZeRO-3/FSDP: unsharded layers gathered at a time")
    phase_peaks: dict[str, int] = Field(description="peak bytes of each phase")
    peak_bytes: int
    peak_phase: str
    offloaded_bytes: int = Field(0, description="bytes kept in CPU memory by offload")


# ------------------------------------------------------------------------------------------- weights etc.


def weights_bytes(inv: Inventory, sharding: Sharding, method: str, base_dtype: str = "fp32") -> int:
    """Bytes of all weights as stored for the regime (before sharding), buffers included.

    ``base_dtype`` bf16/fp16: the frozen base tensors are stored in 16 bits (2 B), adapters in fp32 (LoRA).
    """
    if sharding in ("zero1", "zero2", "zero3") and method != "qlora":
        per = 2  # DeepSpeed keeps the module in bf16/fp16
        return sum(per * t.numel for t in inv.tensors) + inv.buffer_bytes
    frozen_per = 2 if base_dtype in ("bf16", "fp16") else 4
    total = inv.buffer_bytes
    for t in inv.tensors:
        if t.quantized:
            total += nf4_linear_bytes(t.numel)
        elif t.trainable or t.adapter:
            total += 4 * t.numel
        else:
            total += frozen_per * t.numel
    return total


def gradient_bytes(inv: Inventory, sharding: Sharding, method: str) -> int:
    """fp32 gradients of trainable parameters (16-bit under DeepSpeed: its fp32 copy is an optimizer state)."""
    per = 2 if sharding in ("zero1", "zero2", "zero3") and method != "qlora" else 4
    return per * inv.trainable_params


def optimizer_state_bytes(inv: Inventory, optimizer: str, sharding: Sharding = "none", method: str = "full") -> int:
    """Optimizer state bytes for the trainable tensors (before sharding); see the module docstring."""
    total = 0
    trainable = inv.trainable()
    if optimizer == "adamw":
        total = 8 * sum(t.numel for t in trainable)
    elif optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        for t in trainable:
            n = t.numel
            if n >= BNB_MIN_8BIT_SIZE:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
            else:
                total += 8 * n
        total += BNB_QMAP_BYTES if trainable else 0
    elif optimizer == "sgd":
        total = 0
    elif optimizer == "adafactor":
        for t in trainable:
            if len(t.shape) >= 2:
                rows = math.prod(t.shape[:-1])
                cols = math.prod(t.shape[:-2]) * t.shape[-1]
                total += 4 * (rows + cols)
            else:
                total += 4 * t.numel
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    if sharding in ("zero1", "zero2", "zero3") and method != "qlora":
        # DeepSpeed: fp32 master weights (4 B) and fp32 gradient partition (4 B) live with the optimizer
        total += 8 * inv.trainable_params
    return total


def optimizer_temp_bytes(inv: Inventory, optimizer: str) -> int:
    """Temporaries allocated by one optimizer step (before sharding)."""
    if optimizer == "adamw":
        return ADAMW_STEP_TEMP_BYTES_PER_PARAM * inv.trainable_params
    if optimizer == "adafactor":
        biggest = max((t.numel for t in inv.trainable()), default=0)
        return ADAFACTOR_TEMP_COPIES * 4 * biggest
    return 0  # bitsandbytes 8-bit kernels and SGD (momentum 0) update in place


def largest_layer_bytes(inv: Inventory, bytes_per_value: int = 2) -> int:
    """Bytes of the largest decoder layer gathered unsharded (16-bit compute copy)."""
    per_layer: dict[int, int] = {}
    for t in inv.tensors:
        if t.layer is not None:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel
    if not per_layer:
        return bytes_per_value * sum(t.numel for t in inv.tensors)
    return bytes_per_value * max(per_layer.values())


# -------------------------------------------------------------------------------------------- composition


def step_memory(inv: Inventory, *, method: str, optimizer: str, sharding: Sharding, num_gpus: int,
                offload: bool, activations_bytes: int, forward_peak_rel: int, backward_peak_rel: int,
                grad_accum_steps: int = 1, base_dtype: str = "fp32") -> StepMemory:
    """Per-GPU memory of one step from the inventory and the (extrapolated) traced activations.

    ``forward_peak_rel`` / ``backward_peak_rel`` are the traced peaks above the step start, for one GPU with
    all gradients local (the backward peak includes the gradients allocated up to that point).
    With gradient accumulation the gradients of earlier micro-steps are alive through the forward and backward
    of the next ones: they are added to both (an upper bound for backward, whose trace already counts the
    gradients it allocates). ``base_dtype``: dtype of the frozen base weights (see ``weights_bytes``).
    """
    n = max(1, num_gpus) if sharding != "none" else 1
    w_all = weights_bytes(inv, sharding, method, base_dtype)
    g_all = gradient_bytes(inv, sharding, method)
    s_all = optimizer_state_bytes(inv, optimizer, sharding, method)
    temp_all = optimizer_temp_bytes(inv, optimizer)
    overhead = CUDA_OVERHEAD_BYTES
    gathered = 0
    offloaded = 0
    w, g, s, temp = w_all, g_all, s_all, temp_all
    if sharding == "ddp":
        overhead += NCCL_BUFFER_BYTES + g_all  # DDP gradient buckets: one more copy of the gradients
    elif sharding == "zero1":
        s, temp = s_all // n, temp_all // n
    elif sharding == "zero2":
        g, s, temp = g_all // n, s_all // n, temp_all // n
    elif sharding in ("zero3", "fsdp"):
        w, g, s, temp = w_all // n, g_all // n, s_all // n, temp_all // n
        gathered = GATHERED_LAYERS * largest_layer_bytes(inv, 2)
    if sharding in ("zero1", "zero2", "zero3", "fsdp"):
        overhead += NCCL_BUFFER_BYTES
    if offload and sharding in ("zero1", "zero2", "zero3", "fsdp"):
        offloaded += s + temp
        s, temp = 0, 0
        if sharding in ("zero3", "fsdp"):
            offloaded += w
            w = 0
    resident = w + s + overhead + gathered
    # the traced backward peak holds every gradient of a single GPU; with sharded gradients only 1/N stays
    grads_in_peak = g_all - g if sharding in ("zero2", "zero3", "fsdp") else 0
    carried = g if grad_accum_steps > 1 else 0
    phases = {
        "forward/loss end": resident + carried + forward_peak_rel,
        "backward": resident + carried + max(backward_peak_rel - grads_in_peak, 0),
        "optimizer step": resident + g + temp,
    }
    phase = max(phases, key=lambda k: phases[k])
    return StepMemory(weights_bytes=w, gradients_bytes=g, optimizer_bytes=s, activations_bytes=activations_bytes,
                      overhead_bytes=overhead, optimizer_temp_bytes=temp, gathered_bytes=gathered,
                      phase_peaks=phases, peak_bytes=phases[phase], peak_phase=phase, offloaded_bytes=offloaded)


# --------------------------------------------------------------------------------------------- fallback


def formula_activations(config, *, batch_size: int, seq_len: int, attention: str, grad_checkpointing: bool,
                        dtype: str) -> tuple[int, int, int]:
    """Activations by formula when tracing fails: (held, forward peak above start, backward peak above start).

    Per layer (Korthikanti et al. 2022, arXiv:2205.05198): ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit, the
    ``5*a*s/h`` term only with eager attention; full recompute keeps ``2*s*b*h`` per layer. Logits
    ``b*s*V`` in the compute dtype plus the fp32 upcast of the loss. fp32 runs double the per-layer bytes.
    """
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    a = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1))
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    vocab = int(getattr(config, "vocab_size", 0))
    s, b = seq_len, batch_size
    scale = 2 if dtype == "fp32" else 1
    if grad_checkpointing:
        per_layer = 2 * s * b * h * scale
    else:
        per_layer = s * b * h * (34 + (5 * a * s / h if attention == "eager" else 0)) * scale
    logits = b * s * vocab * (2 + 4)  # 16-bit logits + fp32 upcast held for the loss
    held = int(per_layer * layers + logits)
    fwd_peak = held + b * s * vocab * 4  # the loss' fp32 log-softmax temporary
    bwd_peak = held + b * s * vocab * 4  # gradient of the logits while they are still held
    return held, fwd_peak, bwd_peak
