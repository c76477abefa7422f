"""What an estimate is asked for: one typed, validated request (the contract for CLI, advisor, runner, app).

Every field carries its unit in its name or description. Invalid values raise pydantic's ValidationError,
whose messages name the field; ``ftcore.errors.format_validation_error`` makes them readable.
"""

from __future__ import annotations

from typing import Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["full", "lora", "qlora"]
DType = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"]
Attention = Literal["sdpa", "eager"]
Sharding = Literal["none", "ddp", "zero1", "zero2", "zero3", "fsdp"]
TargetPreset = Literal["attention-qv", "attention", "all-linear", "all-linear+experts"]
#: The presets in the order pages and help texts list them.
TARGET_PRESETS: tuple[str, ...] = get_args(TargetPreset)
#: The preset that also adapts the routed experts: all-linear's modules plus peft's ``target_parameters`` on
#: every fused 3D expert weight (transformers 5 ``experts.gate_up_proj`` / ``experts.down_proj``; peft's
#: ``ParamWrapper``, one rank-r LoRA per expert: ``lora_A`` (r x experts, in), ``lora_B`` (out, r x experts)).
EXPERTS_PRESET = "all-linear+experts"
QLoraRegime = Literal["paper", "peft-upcast"]

MAX_SEQ_LEN = 1_048_576  # 1M tokens: longer than any catalog model's context; beyond it a trace is absurd
MAX_BATCH = 4096


class EstimateRequest(BaseModel):
    """One training configuration to estimate, per GPU, for one optimizer step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="catalog id, path to a config.json or model folder, or a hub id (online only)")
    method: Method = Field("lora", description="full fine-tuning, LoRA, or QLoRA (NF4 base + LoRA)")
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r (ignored for full)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default 2 x rank")
    targets: Union[TargetPreset, list[str]] = Field(
        "attention-qv", description=f"preset ({', '.join(TARGET_PRESETS)}) or module names"
    )
    dora: bool = Field(False, description="DoRA: adds a magnitude vector per adapted Linear")
    rslora: bool = Field(False, description="rank-stabilized LoRA scaling (alpha / sqrt(r))")
    adalora: bool = Field(False, description="AdaLoRA adapters (SVD-form, rank budget reallocated)")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora_dropout (the run spec's default 0.05); "
                           "dropout keeps its mask and output as activations")
    dtype: DType = Field("bf16", description="compute dtype of the run")
    master_dtype: DType = Field("fp32", description=(
        "full fine-tuning: dtype of the weights the optimizer updates. fp32 = mixed precision (fp32 master "
        "weights, gradients and optimizer states, 16-bit autocast); bf16/fp16 = pure 16-bit (weights, gradients "
        "and AdamW states in that dtype, no autocast, as torchtune, TRL with a bf16 model and LLaMA-Factory's "
        "pure_bf16 train); must equal dtype"))
    qlora_regime: QLoraRegime = Field("paper", description=(
        "QLoRA: paper = the QLoRA paper's regime (norms fp32; embeddings, LM head and the rest in the compute "
        "dtype); peft-upcast = peft's prepare_model_for_kbit_training (every non-quantized weight fp32)"))
    optimizer: Optimizer = Field("adamw", description="optimizer whose states are counted")
    batch_size: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batch per GPU (sequences)")
    seq_len: int = Field(512, ge=1, le=MAX_SEQ_LEN, description="tokens per sequence")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    grad_accum_steps: int = Field(1, ge=1, le=4096, description=(
        "gradient accumulation steps; above 1 the gradients stay allocated through the next micro-steps"))
    attention: Attention = Field("sdpa", description="attention implementation")
    eval_batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description=(
        "sequences per eval forward (the runner's per_device_eval_batch_size); default batch_size"))
    generate_batch_size: int = Field(16, ge=1, le=MAX_BATCH, description=(
        "prompts per generate() call in the eval (runner.models.GENERATE_BATCH)"))
    max_new_tokens: int = Field(64, ge=0, le=MAX_SEQ_LEN, description=(
        "tokens generated per prompt in the eval (runner.train.recipe.EXACT_MATCH_MAX_NEW_TOKENS); 0 = no generation"))
    gpu: str = Field("a100-80gb", description="GPU catalog id (see `ftadvisor gpus`)")
    num_gpus: int = Field(1, ge=1, le=65536, description="number of GPUs")
    sharding: Sharding = Field("none", description="multi-GPU strategy")
    offload: bool = Field(False, description="offload optimizer states (and ZeRO-3 params) to CPU")
    examples: int | None = Field(None, ge=1, description="training examples")
    tokens_per_example: int | None = Field(None, ge=1, description="typical tokens per example")
    epochs: float = Field(1.0, gt=0, le=1000, description="passes over the data")
    tokens: int | None = Field(None, ge=1, description="total training tokens (instead of examples x tokens x epochs)")
    mfu: float | None = Field(None, gt=0, le=1, description="model FLOPs utilisation; default per GPU")
    price: float | None = Field(None, ge=0, description="USD per GPU-hour; default from the GPU catalog")

    @model_validator(mode="after")
    def _check(self):
        if isinstance(self.targets, list) and not self.targets:
            raise ValueError(f"targets: give a preset ({', '.join(TARGET_PRESETS)}) or at least one module name")
        if self.master_dtype != "fp32":
            if self.method != "full":
                raise ValueError(f"master_dtype: pure {self.master_dtype} applies to full fine-tuning (LoRA and QLoRA "
                                 "keep fp32 adapters); use --master-dtype fp32 or --method full")
            if self.master_dtype != self.dtype:
                raise ValueError(f"master_dtype: pure 16-bit trains in the weights' own dtype, so master_dtype "
                                 f"{self.master_dtype} needs --dtype {self.master_dtype} (got {self.dtype})")
            # FSDP shards the parameters in the dtype they were loaded in; accelerate upcasts trainable ones to
            # fp32 only when mixed precision is on (accelerate utils/fsdp_utils.py fsdp2_prepare_model, "FSDP
            # upcast of low precision parameters"), so a 16-bit model without mixed precision trains pure 16-bit
            # sharded. DeepSpeed's bf16/fp16 modes always create fp32 master partitions.
            if self.sharding in ("zero1", "zero2", "zero3"):
                raise ValueError("master_dtype: pure 16-bit runs on one GPU, DDP or FSDP; DeepSpeed ZeRO keeps "
                                 "its own fp32 master weights; use --master-dtype fp32 or --sharding fsdp")
        if self.num_gpus > 1 and self.sharding == "none":
            object.__setattr__(self, "sharding", "ddp")
        return self

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    def train_tokens(self) -> int | None:
        """Tokens processed in training, or None when neither tokens nor examples x tokens_per_example is given."""
        if self.tokens is not None:
            return self.tokens
        if self.examples is not None and self.tokens_per_example is not None:
            return int(self.examples * self.tokens_per_example * self.epochs)
        return None
