"""Memory of one steady-state training step, per GPU, as the runner runs it.

The regime counted (``runner/train/recipe.py`` + HF Trainer defaults, read from their source):

* **full, one GPU or DDP, master_dtype fp32** (mixed precision): the model is loaded in fp32 (master
  weights); ``bf16``/``fp16`` runs use Trainer's autocast, so every weight is cast to 16-bit inside the forward
  pass and those casts that backward needs stay alive as activations (the trace sees them). Gradients are fp32
  (the dtype of the parameters).
* **full, pure 16-bit** (``master_dtype`` bf16/fp16; torchtune, TRL with a bf16 model, LLaMA-Factory
  ``pure_bf16``): the model is loaded in that dtype and trained without autocast, so weights and gradients are
  2 B per parameter, and torch AdamW keeps its moments in the parameter's dtype (``torch.zeros_like(p)``):
  4 B per parameter. bitsandbytes 8-bit states are uint8 whatever the dtype (small tensors fp32); transformers
  Adafactor keeps fp32 factors (it upcasts the gradient first) and makes fp32 copies of the 16-bit parameter
  and gradient at the step.
* **LoRA (rsLoRA, DoRA, LoRA+, AdaLoRA), one GPU or DDP**: ``bf16``/``fp16`` runs load the frozen base in that
  16-bit dtype (2 B per weight, ``runner/train/recipe.py`` ``lora_base_dtype``; buffers such as RoPE ``inv_freq``
  stay fp32 as transformers creates them); peft keeps every adapter tensor in fp32 (4 B,
  ``autocast_adapter_dtype=True``), so gradients and optimizer states are fp32 and of the adapters only. The
  Trainer still autocasts forward and loss (only the fp32 adapter weights get cast copies). fp32 runs: fp32
  base, no autocast.
* **QLoRA**: every Linear but the LM head is NF4 with double quantization (bitsandbytes' exact storage, see
  ``nf4.nf4_linear_bytes``); compute dtype bf16 (fp16 when the run is fp16). ``qlora_regime`` ``paper``
  (the runner's default, the QLoRA paper's ``qlora.py``): every other weight (embeddings, LM head) in the
  compute dtype, the norms (modules named ``*norm*``) in fp32; ``peft-upcast``: peft's
  ``prepare_model_for_kbit_training`` upcasts every non-quantized weight to fp32. LoRA weights fp32 in both.
* **ZeRO-1/2/3 (DeepSpeed)**, read from DeepSpeed 0.19.8 (``deepspeed/runtime/zero/stage_1_and_2.py``,
  ``stage3.py``, ``config.py``) with the runner's ``ds_config.json`` (``runner/launch/distributed.py``: stage,
  ``overlap_comm`` and ``contiguous_gradients`` on, every bucket size left at DeepSpeed's default) and the
  Trainer's own torch AdamW handed to ``deepspeed.initialize``: the module is cast to bf16/fp16 (2 B per weight;
  the 16-bit gradients too, ``grad_accum_dtype`` defaults to the model dtype). The optimizer steps fp32 *master*
  copies of the trainable values, one flat tensor per Trainer param group (ZeRO-1/2) or per sub-group of at most
  ``sub_group_size`` values (ZeRO-3); each GPU holds 1/N of them (4 B) and the optimizer's states of its
  partition (AdamW: m and v, 8 B). The fp32 *gradient* of a partition exists only while its group is stepped
  (``single_grad_partition`` / ``_prepare_fp32_grad_for_sub_group``, dropped by ``_release_sub_group``), so it
  and AdamW's sqrt temporary are bounded by the largest group stepped at once (``zero_step_values``), not kept
  for the whole partition. ZeRO-1/2 keep 16-bit gradients of the partition (2 B) and allocate two reduce buckets
  of ``reduce_bucket_size`` values for the backward (``setup_buckets``, double-buffered with ``overlap_comm``;
  freed by the epilogue); ZeRO-3 keeps a 16-bit gradient partition buffer (``grad_partitions_flat_buffer``) and
  one reduce bucket from init on, keeps parameters of at most ``stage3_param_persistence_threshold`` values
  whole on every GPU, and keeps gathered what it reuses within ``stage3_max_reuse_distance`` values
  (``zero3_gathered_values``); nothing is gathered at the step (``_partition_all_parameters``). DeepSpeed's own
  estimators (``estimate_zero2/3_model_states_mem_needs``: ``2P + 18P/N`` and ``4 x largest module + 18P/N``,
  "18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states") count the fp32 gradient for the whole partition
  and no AdamW temporary, and ZeRO-3's 18 leaves out one of its two 16-bit partitions (``tests/test_zero_memory.py``
  compares both). Activations are traced with 16-bit weights and no autocast.
* **FSDP full-shard** (Trainer/accelerate, FSDP2 ``fully_shard`` as the runner launches it; FSDP1 alike): each
  GPU holds 1/N of every parameter in the dtype it has when wrapped, its gradient shard in the same dtype and
  the optimizer states of that shard only (``fsdp_shard_bytes``, ``tests/test_fsdp_memory.py`` on a real
  two-process gloo step). That dtype: accelerate upcasts the *trainable* parameters to fp32 when mixed
  precision is on ("FSDP upcast of low precision parameters", ``accelerate/utils/fsdp_utils.py``
  ``fsdp2_prepare_model``; FSDP1: ``Accelerator.prepare_model``, PR #2674), so master_dtype fp32 = fp32 shards
  gathered in 16-bit (``MixedPrecisionPolicy(param_dtype=bf16)``) and fp32 gradient shards; a 16-bit model
  without mixed precision (master_dtype bf16/fp16) stays 16-bit: weights, gradients and AdamW moments 2 B each,
  sharded; frozen parameters (the LoRA base, QLoRA's NF4 storage with ``bnb_4bit_quant_storage`` = the compute
  dtype) are sharded in their load dtype and never upcast. Unsharded at a time (``fsdp_unsharded``): the
  current and the prefetched decoder layer in the compute dtype (``BackwardPrefetch.BACKWARD_PRE``, FSDP2's
  implicit prefetch), the tail unit (final norm + LM head: accelerate wraps it with
  ``reshard_after_forward=False``, so it stays gathered from the loss into backward), and in backward one layer's
  unsharded gradients, the reduce-scatter input; none of them at the optimizer step (everything is resharded by
  then). Activations as ZeRO.
* **Optimizer states** (GPU bytes): ``adamw`` = ``adamw_torch`` (foreach on CUDA; the step ``step`` counters
  are CPU scalars): two fp32 moments, 8 B per trainable parameter, plus one fp32 temporary per parameter at
  the step (``torch._foreach_sqrt`` in ``_multi_tensor_adamw``). ``adamw-8bit`` / ``paged-adamw-8bit``
  (bitsandbytes ``AdamW8bit``): two uint8 states + one fp32 absmax per 256 values each, for tensors with at
  least 4096 values (``min_8bit_size``); smaller tensors keep fp32 states; plus the two shared 256-entry fp32
  quantization maps; paged states may be evicted to CPU under pressure. ``sgd`` = Trainer's ``sgd``
  (``torch.optim.SGD`` with momentum 0: no state). ``adafactor`` (transformers, ``beta1=None``): factored second
  moment (row + column fp32 vectors) for tensors with 2+ dims, a full fp32 moment otherwise.
* **What the card holds** (``card_memory``): the *allocated* peak is the tensors of the step plus the cuBLAS
  workspaces and DDP's gradient buckets (``gradient_as_bucket_view=False``, PyTorch default), what
  ``torch.cuda.max_memory_allocated`` reports; the *reserved* peak adds the caching allocator's cached and
  fragmented blocks (``ALLOCATOR_RESERVED_SHORTFALL``), what ``torch.cuda.max_memory_reserved`` reports; the
  *device* peak adds what lives outside the allocator (CUDA context, NCCL buffers), what ``nvidia-smi`` shows.
  ``fits`` compares the device peak plus ``FIT_HEADROOM_FRACTION`` of the card with the card's usable memory
  (the ``nvidia-smi`` total, ``data/gpus.csv`` ``usable_mib``).
* **Step**: optimizer states already allocated, gradients freed after the step (``zero_grad(set_to_none)``).
  The peak is the largest of forward/loss end, backward and optimizer step.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from estimator.nf4 import nf4_linear_bytes

GIB = 1024**3
MIB = 1024**2

# --- what the card holds beyond the step's tensors (see ``card_memory``)
# CUDA context (driver state, module images of PyTorch's kernels, cuBLAS/cuDNN handles): created outside
# PyTorch's allocator, so in nvidia-smi but not in max_memory_reserved. Measured 300-600 MiB per process by GPU
# generation and CUDA version (lazy module loading, CUDA >= 11.7, keeps it near the low end); ml-engineering
# (Stas Bekman, training/performance) says "about 0.5-1 GiB" for context + allocator. Upper end of the context.
CUDA_CONTEXT_BYTES = 600 * MIB
# cuBLAS workspace per handle, allocated through PyTorch's caching allocator (so in max_memory_allocated):
# PyTorch aten/src/ATen/cuda/CublasHandlePool.cpp, default CUBLAS_WORKSPACE_CONFIG ":4096:8" on sm90+
# (4096 KiB x 8 = 32 MiB) and ":4096:2:16:8" before (2 x 4 MiB + 8 x 16 KiB); NVIDIA's cuBLAS docs
# (cublasSetWorkspace) recommend 32 MiB on Hopper, 4 MiB before.
CUBLAS_WORKSPACE_BYTES_SM90 = 4096 * 1024 * 8
CUBLAS_WORKSPACE_BYTES_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8
# one handle (and workspace) per thread and stream: the forward thread and autograd's device thread
CUBLAS_HANDLES = 2
# Caching allocator: reserved = allocated / (1 - shortfall). PyTorch's own FakeTensor/MemTracker estimate is
# 0.3% off max_memory_allocated but 8.5% (median, up to 33%) below max_memory_reserved on H100 training steps
# (sanketpurandare/mem-run-estimator tables, quoted in issue 10): the gap is blocks the allocator caches and
# the fragmentation of its 2 MiB-rounded segments. The median is the model; the spread is why fits keeps a
# headroom.
ALLOCATOR_RESERVED_SHORTFALL = 0.085
# NCCL communicator buffers in multi-GPU runs, outside PyTorch's allocator: NCCL_BUFFSIZE defaults to 4 MiB per
# channel and peer (NCCL environment variables docs); with the usual 16-32 channels x send/recv this is a few
# hundred MiB per communicator. One communicator (the default process group) per run here.
NCCL_BUFFER_BYTES = 512 * MIB
# fits = device peak + headroom <= usable memory: the reserved-peak model is a median and real runs spread
# around it (mem-run-estimator: up to 33%); 2% of the card keeps one allocator spike of a few hundred MiB from
# turning an estimate that "fits" into an OOM. Named so the margin shown is honest about it.
FIT_HEADROOM_FRACTION = 0.02
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
# Adafactor's state["RMS"] becomes a 0-dim fp32 tensor per parameter after the first step (transformers
# optimization.py, ``state["RMS"] = self._rms(p_data_fp32)``; measured on a real step, tests/test_memory_exact.py).
ADAFACTOR_RMS_BYTES = 4
# ... and with 16-bit parameters (pure 16-bit) it first makes fp32 copies: ``grad = grad.float()`` and
# ``p_data_fp32 = p.float()`` (transformers optimization.py Adafactor.step): two more.
ADAFACTOR_TEMP_COPIES_16BIT = 4
# FSDP keeps the current layer and prefetches the next one (BackwardPrefetch.BACKWARD_PRE, the default): two layers
# unsharded at a time (DeepSpeed ZeRO-3 follows its own reuse-distance rule, ``zero3_gathered_values``).
GATHERED_LAYERS = 2

# --- DeepSpeed ZeRO (DeepSpeed 0.19.8, ``deepspeed/runtime/zero/config.py`` defaults; the runner's ds_config.json
# sets none of these, ``runner/launch/distributed.py`` ``deepspeed_config``)
ZERO_SHARDINGS = ("zero1", "zero2", "zero3")
DS_REDUCE_BUCKET_SIZE = 500_000_000  # reduce_bucket_size, values
# (allgather_bucket_size allocates nothing: with NCCL's all_gather_into_tensor the updated 16-bit partitions are
# gathered in place into the flat 16-bit groups, runtime/utils.py ``all_gather_dp_groups``)
DS_SUB_GROUP_SIZE = 1_000_000_000  # sub_group_size, values per ZeRO-3 optimizer sub-group
DS_PARAM_PERSISTENCE_THRESHOLD = 100_000  # stage3_param_persistence_threshold: smaller parameters stay whole
DS_PREFETCH_BUCKET_SIZE = 50_000_000  # stage3_prefetch_bucket_size: values gathered ahead of the current module
DS_MAX_REUSE_DISTANCE = 1_000_000_000  # stage3_max_reuse_distance: values; a module reused sooner stays gathered
# ZeRO-1/2 with contiguous_gradients: ``setup_buckets`` allocates one bucket of reduce_bucket_size values per
# gradient dtype, plus a second one with overlap_comm ("double buffers"), at every backward; the epilogue
# (``_release_ipg_buffers``) frees them. ZeRO-3 allocates one per dtype at init and keeps it (``stage3.py``).
DS_ZERO12_REDUCE_BUCKETS = 2
DS_ZERO3_REDUCE_BUCKETS = 1
# bytes of DeepSpeed's 16-bit gradients (bf16/fp16: grad_accum_dtype defaults to the model dtype, engine.py
# ``get_data_types``) and of its fp32 master weights / fp32 gradient of the group being stepped
DS_GRAD16_BYTES = 2
DS_FP32_BYTES = 4
# transformers Trainer.get_decay_parameter_names: these names go to the no-weight-decay param group
TRAINER_NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")

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
    overhead_bytes: int = Field(description="allocated beyond the tensors of the model: cuBLAS workspaces (+ DDP "
                                            "gradient buckets, ZeRO-3's reduce bucket)")
    optimizer_temp_bytes: int = Field(description="temporaries of the optimizer step")
    gathered_bytes: int = Field(0, description="ZeRO-3/FSDP: unsharded layers (and FSDP's tail unit) gathered "
                                               "at a time in forward and backward (``fsdp_unsharded``)")
    phase_peaks: dict[str, int] = Field(description="peak bytes of each phase")
    peak_bytes: int
    peak_phase: str
    offloaded_bytes: int = Field(0, description="bytes kept in CPU memory by offload")


# ------------------------------------------------------------------------------------------- weights etc.

SIXTEEN = ("bf16", "fp16")


def is_norm_tensor(name: str) -> bool:
    """A norm's weight or bias, by the QLoRA paper's rule (artidoro/qlora ``qlora.py``: ``'norm' in name`` of
    the module): those stay fp32 in the paper's regime."""
    module = name.rsplit(".", 1)[0] if "." in name else name
    return "norm" in module


def weights_bytes(inv: Inventory, sharding: Sharding, method: str, base_dtype: str = "fp32",
                  master_dtype: str = "fp32") -> int:
    """Bytes of all weights as stored for the regime (before sharding), buffers included.

    ``base_dtype`` bf16/fp16: the frozen base tensors are stored in 16 bits (2 B), adapters in fp32 (LoRA); for
    QLoRA the paper's regime (norms stay fp32). ``master_dtype`` bf16/fp16 (full): every weight is 16-bit.
    """
    if sharding in ("zero1", "zero2", "zero3") and method != "qlora":
        per = 2  # DeepSpeed keeps the module in bf16/fp16
        return sum(per * t.numel for t in inv.tensors) + inv.buffer_bytes
    if method == "full" and master_dtype in SIXTEEN:
        return sum(2 * t.numel for t in inv.tensors) + inv.buffer_bytes
    frozen_per = 2 if base_dtype in SIXTEEN else 4
    total = inv.buffer_bytes
    for t in inv.tensors:
        if t.quantized:
            total += nf4_linear_bytes(t.numel)
        elif t.trainable or t.adapter:
            total += 4 * t.numel
        elif method == "qlora" and frozen_per == 2 and is_norm_tensor(t.name):
            total += 4 * t.numel
        else:
            total += frozen_per * t.numel
    return total


def _param_bytes(sharding: Sharding, method: str, master_dtype: str) -> int:
    """Bytes per value of the trainable parameters' gradients (and AdamW's moments' dtype)."""
    if sharding in ("zero1", "zero2", "zero3") and method != "qlora":
        return 2  # DeepSpeed's 16-bit module: its fp32 copy is an optimizer state
    return 2 if method == "full" and master_dtype in SIXTEEN else 4


def gradient_bytes(inv: Inventory, sharding: Sharding, method: str, master_dtype: str = "fp32") -> int:
    """Gradients of trainable parameters in the parameters' dtype (fp32; 16-bit for pure 16-bit and under
    DeepSpeed, whose fp32 copy is an optimizer state)."""
    return _param_bytes(sharding, method, master_dtype) * inv.trainable_params


def optimizer_state_bytes(inv: Inventory, optimizer: str, sharding: Sharding = "none", method: str = "full",
                          master_dtype: str = "fp32") -> int:
    """Optimizer state bytes for the trainable tensors (before sharding); see the module docstring."""
    total = 0
    trainable = inv.trainable()
    deepspeed = sharding in ZERO_SHARDINGS and method != "qlora"
    if deepspeed:
        # DeepSpeed hands the optimizer one flat 1-D fp32 master tensor per group (so Adafactor cannot factor it)
        trainable = [TensorInfo(name=f"group{i}", shape=(sum(t.numel for t in g),), trainable=True)
                     for i, g in enumerate(trainer_param_groups(inv)) if g]
    pure16 = method == "full" and master_dtype in SIXTEEN and sharding not in ZERO_SHARDINGS
    if optimizer == "adamw":
        # torch AdamW: exp_avg / exp_avg_sq = zeros_like(p), so in the parameter's dtype
        total = (2 * 2 if pure16 else 2 * 4) * sum(t.numel for t in trainable)
    elif optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        for t in trainable:
            n = t.numel
            if n >= BNB_MIN_8BIT_SIZE:
                total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK)
            else:
                total += 8 * n  # bitsandbytes: fp32 states for small tensors, whatever the parameter dtype
        total += BNB_QMAP_BYTES if trainable else 0
    elif optimizer == "sgd":
        total = 0
    elif optimizer == "adafactor":
        for t in trainable:  # fp32 factors: Adafactor upcasts a 16-bit gradient before creating its state
            if len(t.shape) >= 2:
                rows = math.prod(t.shape[:-1])
                cols = math.prod(t.shape[:-2]) * t.shape[-1]
                total += 4 * (rows + cols)
            else:
                total += 4 * t.numel
            total += ADAFACTOR_RMS_BYTES
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    if deepspeed:
        # DeepSpeed's fp32 master weights (single_partition_of_fp32_groups / fp32_partitioned_groups_flat) live
        # with the optimizer; its fp32 gradient exists only at the step (``zero_step_temp_bytes``)
        total += DS_FP32_BYTES * inv.trainable_params
    return total


def optimizer_temp_bytes(inv: Inventory, optimizer: str, master_dtype: str = "fp32", method: str = "full") -> int:
    """Temporaries allocated by one optimizer step (before sharding)."""
    pure16 = method == "full" and master_dtype in SIXTEEN
    if optimizer == "adamw":
        per = 2 if pure16 else ADAMW_STEP_TEMP_BYTES_PER_PARAM  # the sqrt temporary has the moments' dtype
        return per * inv.trainable_params
    if optimizer == "adafactor":
        biggest = max((t.numel for t in inv.trainable()), default=0)
        return (ADAFACTOR_TEMP_COPIES_16BIT if pure16 else ADAFACTOR_TEMP_COPIES) * 4 * biggest
    return 0  # bitsandbytes 8-bit kernels and SGD (momentum 0) update in place


def trainer_param_groups(inv: Inventory) -> list[list[TensorInfo]]:
    """The Trainer's two optimizer param groups, in model order: weight decay, then no weight decay
    (``Trainer.create_optimizer`` with ``get_decay_parameter_names``; DeepSpeed flattens and partitions each group
    on its own). Names are matched as the Trainer matches them; a LayerNorm module named without "norm" (GPT-2's
    ``ln_1``) stays in the decay group here, a few thousand values off."""
    decay: list[TensorInfo] = []
    no_decay: list[TensorInfo] = []
    for t in inv.trainable():
        name = t.name.lower()
        (no_decay if any(re.search(p, name) for p in TRAINER_NO_DECAY_PATTERNS) else decay).append(t)
    return [decay, no_decay]


def zero3_sub_groups(group: list[TensorInfo], num_gpus: int) -> list[int]:
    """Values per GPU of each ZeRO-3 optimizer sub-group of one param group: DeepSpeed's
    ``_create_fp16_sub_groups`` adds parameters' partitions (``ceil(numel / N)`` each, ``partition_numel``) to a
    sub-group until it reaches ``sub_group_size`` (so a sub-group may pass it by one parameter)."""
    parts = [-(-t.numel // max(1, num_gpus)) for t in group]
    if sum(parts) <= DS_SUB_GROUP_SIZE:
        return [sum(parts)] if parts else []
    sizes: list[int] = []
    current = 0
    for i, part in enumerate(parts):
        current += part
        if current >= DS_SUB_GROUP_SIZE or i == len(parts) - 1:
            sizes.append(current)
            current = 0
    return sizes


def zero_step_values(inv: Inventory, sharding: Sharding, num_gpus: int) -> int:
    """Values per GPU of the largest group DeepSpeed's optimizer steps at once: ZeRO-1/2 step each Trainer param
    group's flat partition in turn (``stage_1_and_2.py`` ``step``: ``for i, group in enumerate(self.bit16_groups)``,
    the partition padded to a multiple of N); ZeRO-3 steps each sub-group in turn (``stage3.py`` ``step``)."""
    groups = trainer_param_groups(inv)
    if sharding == "zero3":
        return max((v for g in groups for v in zero3_sub_groups(g, num_gpus)), default=0)
    return max((-(-sum(t.numel for t in g) // max(1, num_gpus)) for g in groups), default=0)


def zero_step_temp_bytes(optimizer: str, step_values: int) -> int:
    """Temporaries of one DeepSpeed step on ``step_values`` values (the largest group stepped at once): the fp32
    gradient of the group (``flat_grad_partition.to(fp32)`` / ``_prepare_fp32_grad_for_sub_group``, 4 B, dropped
    before the next group) plus what the optimizer itself allocates on the fp32 master tensor (AdamW's sqrt
    temporary; Adafactor's two full-size temporaries; 8-bit and SGD none, see ``optimizer_temp_bytes``)."""
    if optimizer == "adamw":
        per = ADAMW_STEP_TEMP_BYTES_PER_PARAM
    elif optimizer == "adafactor":
        per = ADAFACTOR_TEMP_COPIES * 4
    else:
        per = 0
    return (DS_FP32_BYTES + per) * step_values


def zero3_weight_bytes(inv: Inventory, num_gpus: int) -> int:
    """One GPU's 16-bit parameters under ZeRO-3, buffers included: each parameter's partition
    (``ceil(numel / N)`` values, ``ds_tensor``), and parameters of at most ``DS_PARAM_PERSISTENCE_THRESHOLD`` values
    also whole (``mark_persistent_parameters``: gathered once, never released; norms and biases)."""
    total = inv.buffer_bytes
    for t in inv.tensors:
        total += DS_GRAD16_BYTES * -(-t.numel // max(1, num_gpus))
        if t.numel <= DS_PARAM_PERSISTENCE_THRESHOLD:
            total += DS_GRAD16_BYTES * t.numel  # the whole copy, on top of its partition
    return total


def zero3_gathered_values(inv: Inventory) -> int:
    """Values ZeRO-3 holds gathered (whole, in the compute dtype) at the end of forward and into backward.

    DeepSpeed's ``PartitionedParameterCoordinator.__params_to_release`` keeps a module's parameters gathered after
    its forward when they are used again within ``stage3_max_reuse_distance`` values of traversed modules; a module's
    next use is its own backward, twice the parameters after it away (the rest of forward, then backward back down
    to it). So the trailing units (final norm, LM head, the last decoder layers) with ``2 x values after them <=
    DS_MAX_REUSE_DISTANCE`` stay gathered from the loss into backward (all of a model of up to 5e8 values: why ZeRO-3
    can hold more than ZeRO-2 on small models, DeepSpeed issues #3734, #5305), on top of the layer being computed
    and the ``stage3_prefetch_bucket_size`` values fetched ahead. Units: the input embedding, each decoder layer,
    then everything else; parameters under the persistence threshold are whole anyway (``zero3_weight_bytes``)."""
    def values(tensors: list[TensorInfo]) -> int:
        return sum(t.numel for t in tensors if t.numel > DS_PARAM_PERSISTENCE_THRESHOLD)

    embed = [t for t in inv.tensors if t.layer is None and _is_input_embedding(t.name)]
    rest = [t for t in inv.tensors if t.layer is None and not _is_input_embedding(t.name)]
    layers: dict[int, list[TensorInfo]] = {}
    for t in inv.tensors:
        if t.layer is not None:
            layers.setdefault(t.layer, []).append(t)
    units = [values(embed)] + [values(layers[i]) for i in sorted(layers)] + [values(rest)]
    total = sum(units)
    kept = 0
    after = 0
    for unit in reversed(units):
        if 2 * after > DS_MAX_REUSE_DISTANCE:
            break
        kept += unit
        after += unit
    return min(total, kept + max(units) + DS_PREFETCH_BUCKET_SIZE)


def largest_layer_bytes(inv: Inventory, bytes_per_value: int = 2) -> int:
    """Bytes of the largest decoder layer gathered unsharded: ``bytes_per_value`` (the compute dtype) per value,
    NF4 storage for QLoRA's quantized weights (gathered as stored, ``bnb_4bit_quant_storage``)."""
    def size(t: TensorInfo) -> int:
        return nf4_linear_bytes(t.numel) if t.quantized else bytes_per_value * t.numel

    per_layer: dict[int, int] = {}
    for t in inv.tensors:
        if t.layer is not None:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + size(t)
    if not per_layer:
        return sum(size(t) for t in inv.tensors)
    return max(per_layer.values())


def fsdp_shard_bytes(total_bytes: int, num_gpus: int) -> int:
    """One GPU's share of ``total_bytes`` sharded over ``num_gpus`` (FSDP2 pads each parameter's dim 0 to a
    multiple of the GPU count, FSDP1 each flat parameter: the largest share, rounded up)."""
    return -(-total_bytes // max(1, num_gpus))


def _is_input_embedding(name: str) -> bool:
    return any(k in name for k in ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings"))


def tail_unit_bytes(inv: Inventory, bytes_per_value: int) -> int:
    """The FSDP tail unit gathered in the compute dtype: the parameters outside the decoder layers but the input
    embedding (final norm, LM head), or with the embedding when the LM head is tied to it (accelerate then puts
    the embedding in the tail: ``fsdp2_prepare_model``, "Carve embed + tail=[final_norm, lm_head]")."""
    outside = [t for t in inv.tensors if t.layer is None and not t.adapter]
    tied = not any(not _is_input_embedding(t.name) and len(t.shape) == 2 for t in outside)
    return bytes_per_value * sum(t.numel for t in outside if tied or not _is_input_embedding(t.name))


def fsdp_unsharded(inv: Inventory, compute_bytes: int, *, tail: bool) -> tuple[int, int]:
    """Bytes gathered on top of the shards in (forward/loss end, backward) under ZeRO-3/FSDP, in the compute
    dtype: the current + prefetched decoder layer (``GATHERED_LAYERS``), the tail unit kept gathered from the
    loss into backward (FSDP via accelerate: ``reshard_after_forward=False``), and in backward the unsharded
    gradients of one layer's trainable parameters (the reduce-scatter input, in the reduce dtype = the compute
    dtype: FSDP2 ``MixedPrecisionPolicy(reduce_dtype=None)``)."""
    layers = GATHERED_LAYERS * largest_layer_bytes(inv, compute_bytes)
    tail_bytes = tail_unit_bytes(inv, compute_bytes) if tail else 0
    per_layer: dict[int, int] = {}
    for t in inv.tensors:
        if t.layer is not None and t.trainable:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.numel
    reduce_scatter = compute_bytes * max(per_layer.values(), default=0)
    return layers + tail_bytes, layers + tail_bytes + reduce_scatter


def moe_qlora_load_peak_bytes(inv: Inventory, load_value_bytes: int, layout: dict | None = None) -> int:
    """GPU bytes at the peak of loading a QLoRA MoE model as the runner loads it (0 when no expert is quantized).

    bitsandbytes' 4-bit loader leaves transformers 5's fused experts in the load dtype (``estimator/experts.py``);
    the runner quantizes each fused tensor the moment the loader sets it (``runner/train/experts.py
    quantize_experts_while_loading``). transformers' loader (``core_model_loading.convert_and_load_state_dict_in_model``)
    builds one fused tensor at a time: a per-expert checkpoint's tensors are read in the load dtype
    (``load_value_bytes``: 2 for the paper regime, 4 for peft-upcast), stacked, and (gate + up) concatenated, so
    2x the fused tensor at its peak (1x for a checkpoint that stores it fused); its loop still holds the last
    tensor it set while it builds the next one. So within a layer whose experts load first F, then G (the
    checkpoint's key order, ``experts.checkpoint_layout``), the peak is the larger of F's build and
    F's NF4 Linears + F in the load dtype + G's build, on top of everything loaded before.

    What is loaded before are the weights whose names sort before the experts module's, in their loaded form (NF4
    for quantized Linears and earlier layers' experts, the load dtype for the rest; adapters come later, and so
    do the paper regime's fp32 norms). The model's names stand in for the checkpoint's: where a model type renames
    (Mixtral's ``block_sparse_moe`` -> ``mlp``) a norm may sort on the other side (``tests/test_moe.py`` measures
    a real load against this).
    """
    import bisect

    from estimator.experts import natural_key

    experts = [t for t in inv.tensors if t.quantized and ".experts." in t.name]
    if not experts:
        return 0
    rows = _load_order(inv, load_value_bytes)
    keys = [key for key, _, _, _ in rows]
    loaded_before = [before for _, before, _, _ in rows] + [rows[-1][1] + rows[-1][2] if rows else 0]
    stored: dict[str, dict[str, list[int]]] = {}  # experts module -> weight name -> [load-dtype bytes, NF4 bytes]
    for t in experts:
        module, _, rest = t.name.rpartition(".experts.")
        acc = stored.setdefault(module + ".experts", {}).setdefault(rest.split(".")[0], [0, 0])
        acc[0] += load_value_bytes * t.numel
        acc[1] += nf4_linear_bytes(t.numel)
    layout = layout or {}
    peak = 0
    for module, mats in stored.items():
        before = inv.buffer_bytes + loaded_before[bisect.bisect_left(keys, natural_key(module))]
        kind = {n: layout.get(n, (((1, n),), True)) for n in mats}  # unknown: in name order, per expert
        built, nf4_done, previous = 0, 0, 0
        for n in sorted(mats, key=lambda n: kind[n][0]):
            built = max(built, nf4_done + previous + (2 if kind[n][1] else 1) * mats[n][0])
            nf4_done += mats[n][1]
            previous = mats[n][0]  # the loader still holds it while it builds the next one
        peak = max(peak, before + built)
    return peak


#: transformers <= 4.40 built a rotary cos/sin cache in every attention layer, (max_position_embeddings, head_dim)
#: each, in the default dtype at construction (``torch.get_default_dtype()``, which ``from_pretrained`` sets to the
#: load's ``torch_dtype``), registered as non-persistent buffers: Mistral / Mixtral ``cos_cached`` + ``sin_cached``
#: (4.39.3 modeling_mistral.py l.93-116, one ``MistralRotaryEmbedding`` per ``MistralAttention``, l.232), Llama
#: ``_cos_cached`` + ``_sin_cached`` "for BC" (4.39.3 modeling_llama.py l.104-113, l.295). Present in 4.40.2 too;
#: gone from Llama and Mistral by 4.42.4 (inv_freq only), Mixtral kept it through 4.44.2. Transformers 5 (the
#: runner's) has one rotary module per model with ``inv_freq`` only, already in ``Inventory.buffer_bytes``.
LEGACY_ROPE_CACHE_MODEL_TYPES = ("llama", "mistral", "mixtral")


def legacy_rope_cache_bytes(config, value_bytes: int) -> int:
    """Bytes of transformers <= 4.40's per-layer rotary caches (``LEGACY_ROPE_CACHE_MODEL_TYPES``): cos and sin,
    (max_position_embeddings, head_dim) per layer, ``value_bytes`` each (the load dtype); 0 for other models.
    Mistral-7B in 16 bits: 32 x 2 x 32768 x 128 x 2 B = 512 MiB."""
    if getattr(config, "model_type", None) not in LEGACY_ROPE_CACHE_MODEL_TYPES:
        return 0
    d = _dims(config)
    positions = int(getattr(config, "max_position_embeddings", 0) or 0)
    return d["layers"] * 2 * positions * d["head_dim"] * value_bytes


def _load_order(inv: Inventory, load_value_bytes: int) -> list[tuple[tuple, int, int, int]]:
    """Every weight in the order transformers' loader reads it (natural key order of the names), as ``(key, bytes
    loaded before it, its bytes as loaded, its load-dtype copy while quantized)``: NF4 for quantized Linears (which
    exist in the load dtype, ``load_value_bytes``, until quantized), the load dtype for the rest; adapters come
    after the load (peft)."""
    import itertools

    from estimator.experts import natural_key

    rows = sorted((natural_key(t.name), nf4_linear_bytes(t.numel) if t.quantized else load_value_bytes * t.numel,
                   load_value_bytes * t.numel if t.quantized else 0)
                  for t in inv.tensors if not t.adapter)
    before = itertools.accumulate((final for _, final, _ in rows), initial=0)
    return [(key, loaded, final, copy) for (key, final, copy), loaded in zip(rows, before)]


def unsharded_qlora_load_peak_bytes(inv: Inventory, load_value_bytes: int) -> int:
    """GPU bytes at the peak of loading a QLoRA model whole on one GPU, as every rank of an FSDP or ZeRO-3 run
    does: transformers' rank-0-only loading skips quantized models (``modeling_utils`` ``not is_quantized``;
    DeepSpeed's ``zero.init`` is off for QLoRA) and bitsandbytes' loader places the model on the rank's GPU
    (``Bnb4BitHfQuantizer.update_device_map``), so each GPU holds the whole 4-bit model before FSDP / ZeRO shard
    it. The loader reads the weights in natural key order, each in the load dtype (``load_value_bytes``), and
    quantizes a Linear's weight into NF4 while that copy still exists (``integrations.bitsandbytes
    .Bnb4bitQuantize``): the peak is the largest of (everything loaded before, in its final form, + that copy + its
    NF4) and the whole model at the end. Adapters come later. A real CPU load matches it (``tests/test_fsdp_qlora.py``)."""
    rows = _load_order(inv, load_value_bytes)
    # the load-dtype copy beside its NF4 (or, not quantized, the weight itself)
    return inv.buffer_bytes + max((before + final + copy for _, before, final, copy in rows), default=0)


def cublas_workspace_bytes(compute_capability: float | None) -> int:
    """cuBLAS workspaces PyTorch allocates for a training step (``CUBLAS_HANDLES`` handles) on this GPU."""
    per = CUBLAS_WORKSPACE_BYTES_SM90 if (compute_capability or 0) >= 9.0 else CUBLAS_WORKSPACE_BYTES_OLDER
    return CUBLAS_HANDLES * per


# -------------------------------------------------------------------------------------------- composition


def step_memory(inv: Inventory, *, method: str, optimizer: str, sharding: Sharding, num_gpus: int,
                offload: bool, activations_bytes: int, forward_peak_rel: int, backward_peak_rel: int,
                grad_accum_steps: int = 1, base_dtype: str = "fp32", master_dtype: str = "fp32",
                workspace_bytes: int = 0, compute_bytes: int = 2) -> StepMemory:
    """Per-GPU *allocated* memory of one step from the inventory and the (extrapolated) traced activations.

    ``forward_peak_rel`` / ``backward_peak_rel`` are the traced peaks above the step start, for one GPU with
    all gradients local (the backward peak includes the gradients allocated up to that point).
    With gradient accumulation the gradients of earlier micro-steps are alive through the forward and backward
    of the next ones: they are added to both (an upper bound for backward, whose trace already counts the
    gradients it allocates). ``base_dtype``: dtype of the frozen base weights (see ``weights_bytes``);
    ``master_dtype``: bf16/fp16 for pure 16-bit full fine-tuning; ``workspace_bytes``: cuBLAS workspaces
    (``cublas_workspace_bytes``); ``compute_bytes``: bytes per value of the copies ZeRO-3/FSDP gather (2 for
    bf16/fp16 runs, 4 for fp32). What the card holds beyond this is ``card_memory``.
    """
    n = max(1, num_gpus) if sharding != "none" else 1
    w_all = weights_bytes(inv, sharding, method, base_dtype, master_dtype)
    g_all = gradient_bytes(inv, sharding, method, master_dtype)
    s_all = optimizer_state_bytes(inv, optimizer, sharding, method, master_dtype)
    temp_all = optimizer_temp_bytes(inv, optimizer, master_dtype, method)
    overhead = workspace_bytes
    gathered = 0
    offloaded = 0
    w, g, s, temp = w_all, g_all, s_all, temp_all
    if sharding == "ddp":
        overhead += g_all  # DDP gradient buckets: one more copy of the gradients
    deepspeed = sharding in ZERO_SHARDINGS and method != "qlora"
    # ZeRO-1/2: reduce buckets alive through backward only; ZeRO-3: the gradient partition buffer is resident
    bucket_bytes = 0
    grads_resident = False
    if sharding == "fsdp" or (sharding == "zero3" and not deepspeed):
        # parameters are sharded, buffers (rotary inv_freq) stay whole on every GPU
        w = fsdp_shard_bytes(w_all - inv.buffer_bytes, n) + inv.buffer_bytes
        g, s, temp = (fsdp_shard_bytes(x, n) for x in (g_all, s_all, temp_all))
    elif sharding == "zero1" and not deepspeed:
        s, temp = s_all // n, temp_all // n
    elif sharding == "zero2" and not deepspeed:
        g, s, temp = g_all // n, s_all // n, temp_all // n
    elif sharding in ZERO_SHARDINGS:
        # DeepSpeed (module docstring): the states and the 16-bit gradients of the partition; the fp32 gradient and
        # the optimizer's temporaries of the largest group stepped at once
        g, s = fsdp_shard_bytes(g_all, n), fsdp_shard_bytes(s_all, n)
        temp = zero_step_temp_bytes(optimizer, zero_step_values(inv, sharding, n))
        if sharding == "zero3":
            w = zero3_weight_bytes(inv, n)
            overhead += DS_ZERO3_REDUCE_BUCKETS * DS_REDUCE_BUCKET_SIZE * DS_GRAD16_BYTES
            grads_resident = True  # grad_partitions_flat_buffer: torch.zeros at init, kept
        else:
            bucket_bytes = DS_ZERO12_REDUCE_BUCKETS * DS_REDUCE_BUCKET_SIZE * DS_GRAD16_BYTES
    fwd_extra = bwd_extra = 0
    if sharding in ("zero3", "fsdp"):
        fwd_extra, bwd_extra = fsdp_unsharded(inv, compute_bytes, tail=sharding == "fsdp")
        if sharding == "zero3" and deepspeed:
            # DeepSpeed's reuse-distance rule instead of FSDP's two layers; backward adds the same unsharded
            # gradients of one layer before they are copied into the reduce bucket
            reduce_scatter = bwd_extra - fwd_extra
            fwd_extra = compute_bytes * zero3_gathered_values(inv)
            bwd_extra = fwd_extra + reduce_scatter
        gathered = fwd_extra
    if offload and sharding in ZERO_SHARDINGS and deepspeed:
        # offload_optimizer: master weights, states, the fp32 gradient partition (pinned CPU buffers,
        # ``initialize_optimizer_states``) and the step (DeepSpeedCPUAdam, in place) are on the CPU; ZeRO-3's
        # offload_param moves the 16-bit partitions there too, and its gradient partition buffer is pinned CPU memory
        offloaded += s + DS_FP32_BYTES * (g // DS_GRAD16_BYTES)
        s, temp, g = 0, 0, 0
        grads_resident = False
        if sharding == "zero3":
            offloaded += w
            w = 0
    elif offload and sharding in ("zero1", "zero2", "zero3", "fsdp"):
        offloaded += s + temp
        s, temp = 0, 0
        if sharding in ("zero3", "fsdp"):
            offloaded += w
            w = 0
    resident = w + s + overhead + (g if grads_resident else 0)
    # the traced backward peak holds every gradient of a single GPU; with sharded gradients only 1/N stays
    # (ZeRO-3's 1/N is already resident)
    if grads_resident:
        grads_in_peak = g_all
    elif sharding in ("zero2", "zero3", "fsdp"):
        grads_in_peak = g_all - g
    else:
        grads_in_peak = 0
    # between micro-steps: ZeRO-1 keeps every 16-bit gradient (it partitions them only at the step)
    accumulated = g_all if sharding == "zero1" and deepspeed and not offload else g
    carried = accumulated if grad_accum_steps > 1 and not grads_resident else 0
    bwd_extra += bucket_bytes
    phases = {
        "forward/loss end": resident + carried + fwd_extra + forward_peak_rel,
        "backward": resident + carried + bwd_extra + max(backward_peak_rel - grads_in_peak, 0),
        # ZeRO-3 / FSDP: every unit is resharded after its backward, nothing is gathered at the step
        "optimizer step": resident + (0 if grads_resident else g) + temp,
    }
    phase = max(phases, key=lambda k: phases[k])
    return StepMemory(weights_bytes=w, gradients_bytes=g, optimizer_bytes=s, activations_bytes=activations_bytes,
                      overhead_bytes=overhead, optimizer_temp_bytes=temp, gathered_bytes=gathered,
                      phase_peaks=phases, peak_bytes=phases[phase], peak_phase=phase, offloaded_bytes=offloaded)


class CardMemory(BaseModel):
    """What one GPU holds at the peak: allocated -> reserved -> device, and whether it fits (bytes)."""

    allocated_peak_bytes: int = Field(description="tensors + cuBLAS workspaces (torch.cuda.max_memory_allocated)")
    reserved_peak_bytes: int = Field(description="allocated + the caching allocator's cached/fragmented blocks "
                                                 "(torch.cuda.max_memory_reserved)")
    allocator_cache_bytes: int = Field(description="reserved minus allocated")
    context_bytes: int = Field(description="CUDA context, outside the allocator")
    nccl_bytes: int = Field(description="NCCL communicator buffers, outside the allocator (multi-GPU)")
    device_peak_bytes: int = Field(description="reserved + context + NCCL: what nvidia-smi shows at the peak")
    phase_peaks: dict[str, int] = Field(description="device bytes of each phase")
    usable_bytes: int = Field(description="the card's usable memory (nvidia-smi total)")
    headroom_bytes: int = Field(description="kept free on top of the device peak (FIT_HEADROOM_FRACTION)")
    margin_bytes: int = Field(description="usable - headroom - device peak (negative: does not fit)")
    fits: bool


def reserved_for(allocated: int) -> int:
    """The caching allocator's reserved bytes for an allocated peak (``ALLOCATOR_RESERVED_SHORTFALL``)."""
    return math.ceil(allocated / (1.0 - ALLOCATOR_RESERVED_SHORTFALL))


def card_memory(allocated_phase_peaks: dict[str, int], *, usable_bytes: int, multi_gpu: bool) -> CardMemory:
    """From the allocated peak of each phase to what the card holds, and ``fits`` with the named headroom."""
    context = CUDA_CONTEXT_BYTES
    nccl = NCCL_BUFFER_BYTES if multi_gpu else 0
    phases = {k: reserved_for(v) + context + nccl for k, v in allocated_phase_peaks.items()}
    allocated = max(allocated_phase_peaks.values())
    reserved = reserved_for(allocated)
    device = reserved + context + nccl
    headroom = int(FIT_HEADROOM_FRACTION * usable_bytes)
    margin = usable_bytes - headroom - device
    return CardMemory(allocated_peak_bytes=allocated, reserved_peak_bytes=reserved,
                      allocator_cache_bytes=reserved - allocated, context_bytes=context, nccl_bytes=nccl,
                      device_peak_bytes=device, phase_peaks=phases, usable_bytes=usable_bytes,
                      headroom_bytes=headroom, margin_bytes=margin, fits=margin >= 0)


def fit_limit_bytes(usable_bytes: int) -> int:
    """The largest device peak that fits a card of ``usable_bytes``."""
    return usable_bytes - int(FIT_HEADROOM_FRACTION * usable_bytes)


# ------------------------------------------------------------------------------------------ eval and host

# transformers' causal-LM loss upcasts the logits (``logits.float()`` in ForCausalLMLoss) and cross_entropy
# makes an fp32 log-softmax of the same size: 4 + 4 bytes per logit on top of the logits themselves.
LOSS_FP32_BYTES_PER_LOGIT = 8
# LlamaMLP-style forward without grads: ``down(act(gate(x)) * up(x))`` holds act, up and their product
# (3 x intermediate) next to the residual stream and the normed input (2 x hidden) at its peak.
NO_GRAD_MLP_COPIES = 3
NO_GRAD_HIDDEN_COPIES = 2
# transformers' checkpoint shards: save_pretrained's default max_shard_size was "5GB" (4.x), the shard size of
# most hub checkpoints; a loading process maps one shard at a time (safetensors mmap) while it copies tensors.
CHECKPOINT_SHARD_BYTES = 5 * 10**9


class EvalMemory(BaseModel):
    """Per-GPU bytes of the eval phase: an eval batch forward without gradients, and generation."""

    resident_bytes: int = Field(description="weights + optimizer states kept during eval (allocated)")
    forward_bytes: int = Field(description="peak of one no-grad eval forward + loss above resident")
    kv_cache_bytes: int = Field(description="KV cache of one generate() batch at prompt + max_new_tokens")
    generation_bytes: int = Field(description="KV cache + prefill peak above resident")
    allocated_peak_bytes: int
    device_peak_bytes: int = Field(description="as the card holds it (reserved + context), see card_memory")
    phase: str = Field(description="eval forward | generation")
    fits: bool


def _dims(config) -> dict[str, int]:
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 1) or 1)
    kv = int(getattr(config, "num_key_value_heads", 0) or heads)
    head_dim = int(getattr(config, "head_dim", 0) or (h // heads if heads else 0))
    inter = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * h)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 0)
    return dict(h=h, heads=heads, kv=kv, head_dim=head_dim, inter=inter, layers=layers,
                vocab=int(getattr(config, "vocab_size", 0) or 0))


def no_grad_forward_bytes(config, *, batch: int, seq_len: int, value_bytes: int, attention: str,
                          logits_tokens: int | None = None) -> int:
    """Peak of one forward without gradients above the weights: one layer's working set (activations of
    earlier layers are freed) or the logits with the loss' fp32 upcast, whichever is larger."""
    d = _dims(config)
    tokens = batch * seq_len
    layer = tokens * (NO_GRAD_HIDDEN_COPIES * d["h"] + NO_GRAD_MLP_COPIES * d["inter"]) * value_bytes
    if attention == "eager":  # scores + softmax probabilities, (b, heads, s, s)
        layer += 2 * batch * d["heads"] * seq_len * seq_len * value_bytes
    logit_tokens = tokens if logits_tokens is None else logits_tokens
    logits = logit_tokens * d["vocab"] * (value_bytes + LOSS_FP32_BYTES_PER_LOGIT)
    return tokens * d["h"] * value_bytes + max(layer, logits)


def kv_cache_bytes(config, *, batch: int, tokens: int, value_bytes: int) -> int:
    """transformers' DynamicCache: a key and a value tensor per layer, (batch, kv_heads, tokens, head_dim)."""
    d = _dims(config)
    return 2 * d["layers"] * batch * d["kv"] * tokens * d["head_dim"] * value_bytes


def eval_memory(config, *, resident_bytes: int, eval_batch: int, seq_len: int, generate_batch: int,
                max_new_tokens: int, value_bytes: int, attention: str, usable_bytes: int,
                multi_gpu: bool) -> EvalMemory:
    """The eval phase as the runner runs it: Trainer.evaluate (loss only, no logits kept: no compute_metrics)
    with the optimizer states still allocated, then greedy generate() for exact match with a KV cache.
    Prompts are bounded by ``seq_len``; the prefill keeps only the last position's logits (logits_to_keep=1)."""
    fwd = no_grad_forward_bytes(config, batch=eval_batch, seq_len=seq_len, value_bytes=value_bytes,
                                attention=attention)
    kv = 0
    gen = 0
    if max_new_tokens > 0:
        kv = kv_cache_bytes(config, batch=generate_batch, tokens=seq_len + max_new_tokens, value_bytes=value_bytes)
        prefill = no_grad_forward_bytes(config, batch=generate_batch, seq_len=seq_len, value_bytes=value_bytes,
                                        attention=attention, logits_tokens=generate_batch)
        gen = kv + prefill
    phase = "generation" if gen > fwd else "eval forward"
    allocated = resident_bytes + max(fwd, gen)
    card = card_memory({"eval": allocated}, usable_bytes=usable_bytes, multi_gpu=multi_gpu)
    return EvalMemory(resident_bytes=resident_bytes, forward_bytes=fwd, kv_cache_bytes=kv, generation_bytes=gen,
                      allocated_peak_bytes=allocated, device_peak_bytes=card.device_peak_bytes, phase=phase,
                      fits=card.fits)


class HostMemory(BaseModel):
    """Host RAM of one training process (bytes)."""

    load_bytes: int = Field(description="loading: the model as loaded on the CPU + one mapped checkpoint shard")
    offload_bytes: int = Field(description="optimizer states (and ZeRO-3/FSDP weights) kept in CPU memory")
    peak_bytes: int
    processes_per_node: int


def host_memory(*, loaded_bytes: int, checkpoint_bytes: int, offloaded_bytes: int, quantized: bool,
                processes_per_node: int) -> HostMemory:
    """Host RAM: the runner loads full and LoRA models on the CPU (``from_pretrained`` without device_map, the
    Trainer moves them to the GPU), reading safetensors through mmap one shard at a time; a 4-bit QLoRA load
    quantizes straight onto the GPU (bitsandbytes needs it), so only the mapped shard is on the host."""
    shard = min(CHECKPOINT_SHARD_BYTES, checkpoint_bytes)
    load = shard + (0 if quantized else loaded_bytes)
    return HostMemory(load_bytes=load, offload_bytes=offloaded_bytes, peak_bytes=max(load, offloaded_bytes),
                      processes_per_node=processes_per_node)


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
