"""RunSpec: everything needed to (re)run one fine-tuning job. Saved as ``spec.json`` in the run folder.

The advisor's Recommendation converts to it; the CLI builds it from flags; the app edits it in a form.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["full", "lora", "qlora"]


class PeftSettings(BaseModel):
    """Adapter settings (LoRA, rsLoRA, DoRA, LoRA+, AdaLoRA). Ignored for full fine-tuning."""

    model_config = ConfigDict(extra="forbid")

    variant: Literal["lora", "loraplus", "adalora"] = Field("lora", description="adapter family")
    r: int = Field(16, ge=1, le=1024, description="rank (AdaLoRA: initial rank)")
    alpha: float = Field(32.0, gt=0, description="lora_alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="lora_dropout")
    target_modules: Union[str, list[str]] = Field(
        "attention-qv", description="preset (attention-qv, attention, all-linear) or module names"
    )
    use_rslora: bool = Field(False, description="rank-stabilized scaling alpha/sqrt(r)")
    use_dora: bool = Field(False, description="weight-decomposed LoRA")
    loraplus_lr_ratio: float = Field(16.0, gt=0, description="LoRA+: learning-rate ratio of B to A")
    adalora_target_r: int = Field(8, ge=1, description="AdaLoRA: average target rank")


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="JSONL, CSV or Parquet file")
    format: Literal["auto", "text", "prompt_completion", "messages"] = Field("auto", description="row format")
    eval_path: str | None = Field(None, description="separate eval file; otherwise eval_fraction is held out")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of rows held out for eval")
    packing: bool = Field(False, description="pack several examples into one sequence")
    completion_only_loss: bool = Field(True, description="loss only on completions / assistant turns")


class DistributionSpec(BaseModel):
    """Multi-process launch through an existing engine (torchrun or accelerate)."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(1, ge=1, le=64, description="processes (GPUs) per node")
    nnodes: int = Field(1, ge=1, le=4096, description="number of nodes")
    node_rank: int = Field(0, ge=0, description="this node's rank")
    master_addr: str = Field("127.0.0.1", description="rendezvous host")
    master_port: int = Field(29500, ge=1, le=65535, description="rendezvous port")
    strategy: Literal["ddp", "fsdp", "zero2", "zero3"] = Field("ddp", description="sharding strategy")
    offload: bool = Field(False, description="CPU offload of optimizer states (and params for zero3/fsdp)")
    launcher: Literal["torchrun", "accelerate"] = Field("torchrun", description="engine that starts the ranks")
    fsdp_state_dict: Literal["sharded", "full"] = Field("full", description="FSDP checkpoint format")

    @model_validator(mode="after")
    def _check(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank must be below nnodes ({self.nnodes}); got {self.node_rank}")
        return self

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


class RunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="human label for the run")
    model: str = Field(description="catalog id, local model folder, or hub id (online only)")
    method: Method = Field("lora")
    peft: PeftSettings = Field(default_factory=PeftSettings)
    quantization: Literal["none", "nf4"] = Field("none", description="nf4 = QLoRA 4-bit base with double quant")
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"] = "adamw"
    learning_rate: float = Field(2e-4, gt=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: float = Field(1.0, gt=0, le=1000)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    micro_batch_size: int = Field(1, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536)
    seq_len: int = Field(512, ge=8, le=1_048_576)
    gradient_checkpointing: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    master_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "full fine-tuning: fp32 = fp32 master weights with 16-bit autocast (mixed precision); bf16/fp16 = pure "
        "16-bit: the model loaded in that dtype, trained without autocast (weights, gradients, AdamW states "
        "16-bit); must equal precision; one process, DDP or FSDP (DeepSpeed keeps fp32 master weights)"))
    qlora_regime: Literal["paper", "peft-upcast"] = Field("paper", description=(
        "QLoRA: paper = norms fp32, embeddings / LM head / other weights in the compute dtype (QLoRA paper); "
        "peft-upcast = prepare_model_for_kbit_training's fp32 upcast of every non-quantized weight"))
    attention: Literal["sdpa", "eager"] = "sdpa"
    dataset: DatasetSpec
    eval_steps: int | None = Field(None, ge=1, description="evaluate every N steps; default once per epoch")
    save_steps: int = Field(50, ge=1, description="checkpoint every N steps")
    save_total_limit: int = Field(3, ge=1)
    logging_steps: int = Field(1, ge=1)
    seed: int = 42
    output_dir: str | None = Field(None, description="run folder; default under the runs directory")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    distribution: DistributionSpec = Field(default_factory=DistributionSpec)
    trust_remote_code: bool = Field(False, description="run model code from the hub: only if you trust it")

    @model_validator(mode="after")
    def _check(self):
        if self.method == "qlora" and self.quantization == "none":
            self.quantization = "nf4"
        if self.method != "qlora" and self.quantization != "none":
            raise ValueError("quantization: 4-bit (nf4) is QLoRA; set method to qlora or quantization to none")
        if self.master_dtype != "fp32":
            if self.method != "full":
                raise ValueError(f"master_dtype: pure {self.master_dtype} applies to full fine-tuning (LoRA and "
                                 "QLoRA keep fp32 adapters); set master_dtype to fp32 or method to full")
            if self.master_dtype != self.precision:
                raise ValueError(f"master_dtype: pure {self.master_dtype} needs precision {self.master_dtype} "
                                 f"(got {self.precision})")
            if self.distribution.world_size > 1 and self.distribution.strategy in ("zero2", "zero3"):
                # FSDP shards the model as loaded (accelerate upcasts trainable parameters to fp32 only with mixed
                # precision on, fsdp2_prepare_model); DeepSpeed's bf16/fp16 optimizer always keeps fp32 master
                # weights in the optimizer state, so a "pure" ZeRO run would not be pure.
                raise ValueError(f"master_dtype: pure {self.master_dtype} cannot run under DeepSpeed "
                                 f"{self.distribution.strategy}: DeepSpeed keeps an fp32 master copy of the weights "
                                 "as optimizer state; set master_dtype to fp32 or strategy to fsdp or ddp")
        return self

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
