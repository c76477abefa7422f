"""The one translation of a run spec into an estimate request: ``RunSpec`` -> ``EstimateRequest``.

Every caller that estimates a run (the advisor's candidates, the Launch page, ``benchmarks/gpu_check.py``, the
export bundle's README) goes through :func:`estimate_request`, so the figure shown is the figure of the run that
is launched. Each ``EstimateRequest`` field is either read from the spec (:data:`FROM_SPEC`, with the spec path it
comes from) or named in :data:`NOT_FROM_SPEC` (what the spec cannot know: the GPU model, its MFU and price, the
dataset's size); each ``RunSpec`` field is either read here or named in :data:`SPEC_NOT_ESTIMATED` with the reason.
``tests/test_estimate_request.py`` walks both models' fields, so a field added to either side fails until it is
placed.
"""

from __future__ import annotations

from typing import Any, Callable

from pydantic import ValidationError

from runner.launch.distributed import estimator_sharding, is_distributed
from runner.errors import RunnerError
from runner.spec import RunSpec


def _world(spec: RunSpec) -> int:
    return spec.distribution.world_size


#: EstimateRequest field -> (spec path it comes from, how it is read). The path names the spec field in errors.
FROM_SPEC: dict[str, tuple[str, Callable[[RunSpec], Any]]] = {
    "model": ("model", lambda s: s.model),
    "method": ("method", lambda s: s.method),  # QLoRA's nf4 quantization is implied by method (RunSpec._check)
    "rank": ("peft.r", lambda s: s.peft.r),
    "alpha": ("peft.alpha", lambda s: s.peft.alpha),
    "targets": ("peft.target_modules", lambda s: s.peft.target_modules),
    "dora": ("peft.use_dora", lambda s: s.peft.use_dora),
    "rslora": ("peft.use_rslora", lambda s: s.peft.use_rslora),
    "adalora": ("peft.variant", lambda s: s.peft.variant == "adalora"),
    "dropout": ("peft.dropout", lambda s: s.peft.dropout),
    "dtype": ("precision", lambda s: s.precision),
    "master_dtype": ("master_dtype", lambda s: s.master_dtype),
    "qlora_regime": ("qlora_regime", lambda s: s.qlora_regime),
    "optimizer": ("optimizer", lambda s: s.optimizer),
    "batch_size": ("micro_batch_size", lambda s: s.micro_batch_size),
    "seq_len": ("seq_len", lambda s: s.seq_len),
    "grad_checkpointing": ("gradient_checkpointing", lambda s: s.gradient_checkpointing),
    "grad_accum_steps": ("gradient_accumulation_steps", lambda s: s.gradient_accumulation_steps),
    "attention": ("attention", lambda s: s.attention),
    # The eval forward runs at the training micro-batch (runner.train.recipe: per_device_eval_batch_size=micro_batch_size).
    "eval_batch_size": ("micro_batch_size", lambda s: s.micro_batch_size),
    "num_gpus": ("distribution.nproc_per_node", _world),  # x nnodes: every rank holds one GPU
    "sharding": ("distribution.strategy", estimator_sharding),  # one process in total: "none"
    # One process runs no DeepSpeed/FSDP engine, so nothing is offloaded (runner.launch.distributed.training_args_overrides).
    "offload": ("distribution.offload", lambda s: bool(s.distribution.offload and is_distributed(s))),
    "epochs": ("epochs", lambda s: s.epochs),
}

#: EstimateRequest fields the spec does not hold, with where they come from instead (keyword arguments below).
NOT_FROM_SPEC: dict[str, str] = {
    "gpu": "the GPU catalog id the run is sized for (the spec says cpu/cuda, not which card)",
    "mfu": "the GPU's model FLOPs utilisation (default from the GPU catalog)",
    "price": "USD per GPU-hour (default from the GPU catalog)",
    "examples": "the dataset's row count (the dataset check or the advisor's answers)",
    "tokens_per_example": "the dataset's typical tokens per row, at most seq_len (rows are truncated to it)",
    "generate_batch_size": "the runner's eval constant runner.models.GENERATE_BATCH (the request's default)",
    "max_new_tokens": "the runner's eval constant runner.train.recipe.EXACT_MATCH_MAX_NEW_TOKENS (the request's default)",
    "tokens": "total tokens: set only when spec.max_steps caps the run (steps x sequences per step x tokens each)",
}

#: RunSpec fields that do not change the estimate, and why (the other direction of the walk).
SPEC_NOT_ESTIMATED: dict[str, str] = {
    "name": "a label",
    "quantization": "implied by method (qlora <=> nf4, RunSpec._check)",
    "learning_rate": "changes no memory or time",
    "lr_scheduler": "changes no memory or time",
    "warmup_ratio": "changes no memory or time",
    "weight_decay": "changes no memory or time (AdamW's decay is applied in place)",
    "max_steps": "read into tokens (see NOT_FROM_SPEC)",
    "dataset": "its size comes from the dataset check (examples, tokens_per_example); packing fills seq_len, "
               "which the estimate already assumes",
    "eval_steps": "how often the eval runs; its memory is the estimate's eval phase (eval_memory) whenever it runs",
    "save_steps": "checkpoints are written from memory already counted",
    "save_total_limit": "disk, not GPU memory",
    "logging_steps": "changes no memory or time",
    "seed": "changes no memory or time",
    "output_dir": "disk, not GPU memory",
    "device": "the estimate is per GPU; the GPU is named separately",
    "trust_remote_code": "only where the model code comes from",
}
#: PeftSettings and DistributionSpec fields that do not change the estimate.
PEFT_NOT_ESTIMATED: dict[str, str] = {
    "loraplus_lr_ratio": "LoRA+ changes learning rates only: same tensors as LoRA",
    "adalora_target_r": "AdaLoRA allocates the initial rank r and prunes it in place: r sets the memory",
}
DISTRIBUTION_NOT_ESTIMATED: dict[str, str] = {
    "nnodes": "read into num_gpus (nproc_per_node x nnodes)",
    "node_rank": "which node this is",
    "master_addr": "rendezvous only",
    "master_port": "rendezvous only",
    "launcher": "torchrun and accelerate start the same ranks",
    "fsdp_state_dict": "checkpoint format on disk",
}


def _tokens_for_max_steps(spec: RunSpec, tokens_per_example: int | None) -> int | None:
    """Tokens of a run capped by ``max_steps``: steps x sequences per step (micro-batch x accumulation x ranks)
    x tokens per sequence (seq_len when packed, else the typical row, at most seq_len)."""
    if spec.max_steps is None:
        return None
    per_sequence = spec.seq_len if spec.dataset.packing or tokens_per_example is None else tokens_per_example
    sequences = spec.micro_batch_size * spec.gradient_accumulation_steps * _world(spec)
    return spec.max_steps * sequences * per_sequence


def estimate_request(spec: RunSpec, *, gpu: str, mfu: float | None = None, price: float | None = None,
                     examples: int | None = None, tokens_per_example: int | None = None):
    """The ``EstimateRequest`` of ``spec`` on the catalog GPU ``gpu`` (per-GPU figures of the launched layout).

    ``examples`` and ``tokens_per_example`` (the dataset's rows and typical tokens per row) give time and cost;
    tokens per example are capped at ``spec.seq_len`` because the runner truncates longer rows. A value the
    estimator refuses raises ``RunnerError`` naming the spec field it came from.
    """
    from estimator.request import EstimateRequest

    if tokens_per_example is not None:
        tokens_per_example = min(int(tokens_per_example), spec.seq_len)
    fields = {name: read(spec) for name, (_, read) in FROM_SPEC.items()}
    fields.update(gpu=gpu, mfu=mfu, price=price, examples=examples, tokens_per_example=tokens_per_example,
                  tokens=_tokens_for_max_steps(spec, tokens_per_example))
    try:
        return EstimateRequest(**fields)
    except ValidationError as exc:
        raise _spec_error(exc) from None


def _spec_error(exc: ValidationError) -> RunnerError:
    """The estimator's validation errors, renamed to the spec fields the values came from."""
    lines, first = [], None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        name = loc[0] if loc else ""
        path = FROM_SPEC[name][0] if name in FROM_SPEC else (name or "spec")
        first = first or path
        got = err.get("input")
        lines.append(f"{path}: {err.get('msg', 'invalid value')}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
    return RunnerError("; ".join(lines), field=first, fix="change that field of the run spec")
