"""What ``estimate()`` returns: the typed ``Estimate`` and its parts (per-GPU bytes, counts, the GPU, storage).

Pure data; ``estimator/cli.py`` and the app pages format it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from estimator.compute import ComputeInfo
from estimator.memory import EvalMemory, HostMemory
from estimator.request import EstimateRequest

#: Bump when an estimate's figures or fields change meaning in a way the code does not show (a library behaviour
#: the figures rely on): ``estimator.result_cache`` keys stored estimates by it. Edits to ``estimator/*.py`` and
#: the shipped tables invalidate stored estimates by themselves (their contents are hashed into the key).
ESTIMATOR_VERSION = 1


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
    load_peak_bytes: int = Field(0, description="allocated at the peak of loading, when it can exceed the step's "
                                                "(QLoRA: load_reason; 0 = none)")
    load_device_peak_bytes: int = Field(0, description="that load peak as the card holds it (reserved + context)")
    load_reason: str = Field("", description="why loading peaks: moe (a layer's fused experts built in 16/32-bit as "
                                             "they quantize) | unsharded (FSDP/ZeRO-3 QLoRA: each GPU loads the "
                                             "whole 4-bit model before it is sharded) | '' (none)")


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
    load_fits: bool = Field(True, description="loading fits the card (QLoRA: memory.load_reason); fits includes it")
    host_memory: HostMemory | None = Field(None, description="host RAM of one training process")

    def failing_phase(self) -> tuple[str, int] | None:
        """Where a run whose training step fits the card fails anyway: ("loading", bytes on the card) for QLoRA on
        fused MoE experts whose load does not fit, ("evaluation", bytes) for an eval phase that does not; None when
        the step itself does not fit, or everything fits."""
        if self.memory.margin_bytes < 0:
            return None
        if not self.load_fits:
            return "loading", self.memory.load_device_peak_bytes
        if not self.eval_fits and self.eval_memory is not None:
            return "evaluation", self.eval_memory.device_peak_bytes
        return None

    def to_json(self) -> dict:
        """The CLI's ``--json`` object: this model's fields, nested as they are here (``.memory.peak_bytes``,
        ``.model.total_params``, ``.compute.cost_usd``, ``.request.sharding``), per-GPU bytes."""
        return self.model_dump(mode="json")


class Activations(BaseModel):
    """Activation bytes of one step (held at the end of forward, peaks above the step start) and its FLOPs."""

    held: int
    forward_peak_rel: int
    backward_peak_rel: int
    flops: float
    source: str
    seconds: float | None = None
    note: str | None = None
    slice_layers: int = 2
    attention: str = "sdpa"
