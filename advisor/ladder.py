"""The fallback ladder: each candidate is the ``RunSpec`` it would launch, estimated through the one spec ->
request mapping (``runner.estimate_request``), and judged against the GPUs and the budget.

From the wanted method: full -> LoRA -> QLoRA -> + gradient checkpointing -> + micro-batch 1 (same effective
batch) -> + more GPUs sharded with ZeRO-3. ``walk_ladder`` returns the first rung that fits, with every
candidate tried.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

from advisor.answers import Answers
from advisor.labels import gib, label, usd
from advisor.result import Candidate
from advisor.rules import Settings

# The ladder's method order (issue #3, from the seed's memory ranking: full > LoRA > QLoRA).
LADDER_METHODS: tuple[str, ...] = ("full", "lora", "qlora")
#: Full fine-tuning's lean regimes, tried right after plain full fine-tuning and before any other method.
LEAN_FULL_RUNGS: tuple[str, ...] = ("l_pure_bf16", "l_pure_bf16_8bit")
# Renting: GPU counts tried on the "more GPUs" rung. One node of 8 is the seed's "GPU Cluster (8+ A100s)"
# (Decision Framework, Q2) and the largest single-node NVLink box in the catalog (HGX, 8 GPUs).
RENT_GPU_COUNTS: tuple[int, ...] = (2, 4, 8)
# Sharding used when the ladder adds GPUs: ZeRO-3 shards weights, gradients and optimizer states (seed, "For Full
# Fine-Tuning": '"stage": 3,  # ZeRO-3: Shard everything').
SHARDED = "zero3"
# Sharding of the pure bf16 rung on several GPUs: FSDP shards a bf16 model as loaded when mixed precision is off
# (accelerate's fsdp2_prepare_model upcasts trainable parameters to fp32 only with mixed precision on), so weights,
# gradients and AdamW states are all bf16 and split N ways (fms-acceleration's FSDP full fine-tuning rows are pure
# bf16; tests/test_fsdp_pure16.py trains so). DeepSpeed ZeRO cannot: it keeps an fp32 master copy as optimizer state.
PURE_SHARDED = "fsdp"
# Strategies that run pure 16-bit on several GPUs (runner.spec.RunSpec refuses the others).
PURE_16BIT_STRATEGIES: tuple[str, ...] = ("ddp", "fsdp")
# Optimizer when no rule sets one: AdamW, the HF Trainer default the seed's examples use (Hands-On Practice Guide).
DEFAULT_OPTIMIZER = "adamw"
# Run spec strategy for each estimator sharding name (runner.spec.DistributionSpec knows ddp | fsdp | zero2 | zero3;
# ZeRO-1 is not offered there, so the next stage up, which saves at least as much memory, stands in).
RUN_STRATEGY = {"none": "ddp", "ddp": "ddp", "zero1": "zero2", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp"}
# Processes per node when more GPUs than DistributionSpec.nproc_per_node allows (64) are given: the largest
# divisor of the count up to 8, the GPUs of one HGX node (the catalog's largest single-node box).
GPUS_PER_NODE = 8
MAX_NPROC_PER_NODE = 64  # runner.spec.DistributionSpec.nproc_per_node's bound
# The dataset is chosen at launch (Recommendation.to_run_spec); candidates carry this placeholder path.
NO_DATASET = ""
# The knobs the ladder turns for memory, besides the method itself: an alternative "at the winner's knobs" takes
# these from the recommendation and keeps its own method settings (rank, optimizer, quantization).
KNOBS = ("gradient_checkpointing", "micro_batch_size", "gradient_accumulation_steps", "sharding")


class Context(BaseModel):
    """Everything the physics loop needs, computed once."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    answers: Answers
    book: Any
    facts: dict[str, Any]
    settings: dict[str, Settings]
    seq_len: int
    gpu: Any | None  # estimator.catalog.GPU or None when renting


def settings_dict(settings: Settings) -> dict[str, Any]:
    """One method's configured settings as a rung's settings (the keys ``run_spec`` reads), before the ladder
    turns any knob."""
    v = settings.values
    rank = settings.rank
    return dict(
        rank=rank,
        alpha=float(v.get("alpha_per_rank", 2) * rank) if rank else None,
        dropout=v.get("dropout") if rank else None,
        target_modules=v.get("target_modules", "attention-qv") if rank else None,
        rslora=bool(v.get("rslora", False)),
        dora=bool(v.get("dora", False)),
        quantization=v.get("quantization", "none"),
        optimizer=v.get("optimizer", DEFAULT_OPTIMIZER),
        learning_rate=float(v["learning_rate"]),
        micro_batch_size=int(v.get("micro_batch_size", 1)),
        gradient_accumulation_steps=int(v.get("gradient_accumulation_steps", 1)),
        sharding=v.get("sharding"),
        gradient_checkpointing=False,
        pure_16bit=False,  # full fine-tuning in pure bf16 (master_dtype bf16): the lean full rungs set it
    )


def _dtype_for(gpu) -> str:
    # Seed, "For Full Fine-Tuning" / Mixed Precision: "fp16=True,  # For older GPUs", "bf16=True,  # For A100s".
    return "bf16" if gpu.bf16_support else "fp16"


def _distribution(num_gpus: int, sharding: str | None):
    """The launch layout of ``num_gpus`` ranks: one node while DistributionSpec allows it, else nodes of the
    largest divisor of the count up to GPUS_PER_NODE."""
    from runner.spec import DistributionSpec

    per_node = num_gpus
    if num_gpus > MAX_NPROC_PER_NODE:
        per_node = max(d for d in range(1, GPUS_PER_NODE + 1) if num_gpus % d == 0)
    return DistributionSpec(nproc_per_node=per_node, nnodes=num_gpus // per_node,
                            strategy=RUN_STRATEGY[sharding or "ddp"])


def run_spec(ctx: Context, method: str, s: dict[str, Any], gpu, num_gpus: int):
    """The RunSpec one candidate launches: the rung's settings ``s`` (``settings_dict`` keys) for ``method`` on
    ``num_gpus`` x ``gpu``. A setting that changes the run must be mapped here, or the estimate misses it."""
    from runner.spec import DatasetSpec, PeftSettings, RunSpec

    default = PeftSettings()
    adapter = method != "full"
    peft = PeftSettings(
        r=s["rank"] or default.r,
        alpha=s["alpha"] or default.alpha,
        dropout=s["dropout"] if s["dropout"] is not None else default.dropout,
        target_modules=s["target_modules"] or default.target_modules,
        use_rslora=bool(s["rslora"] and adapter),
        use_dora=bool(s["dora"] and adapter),
    )
    dist = _distribution(num_gpus, s["sharding"])
    return RunSpec(
        name=f"{method} {ctx.answers.model}" + (f" r={s['rank']}" if s["rank"] and adapter else ""),
        model=ctx.answers.model,
        method=method,
        peft=peft,
        quantization="nf4" if method == "qlora" else "none",
        optimizer=s["optimizer"],
        learning_rate=s["learning_rate"],
        epochs=ctx.answers.epochs,
        micro_batch_size=s["micro_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"],
        seq_len=ctx.seq_len,
        gradient_checkpointing=s["gradient_checkpointing"],
        precision=_dtype_for(gpu),
        master_dtype=_master_dtype(method, s, gpu, dist),
        dataset=DatasetSpec(path=NO_DATASET),
        distribution=dist,
    )


def _master_dtype(method: str, s: dict[str, Any], gpu, dist) -> str:
    """bf16 for a lean full rung (pure bf16) where it can run: a card with bf16 (pure fp16 has no loss scaling)
    and one process, DDP or FSDP (``PURE_16BIT_STRATEGIES``; DeepSpeed ZeRO keeps an fp32 master copy as
    optimizer state); else fp32 master weights."""
    pure = s.get("pure_16bit") and method == "full" and gpu.bf16_support
    if pure and (dist.world_size == 1 or dist.strategy in PURE_16BIT_STRATEGIES):
        return "bf16"
    return "fp32"


def request(ctx: Context, spec, gpu):
    """The estimate of ``spec`` on ``gpu`` with the answers' data size: the one mapping, as every caller uses it."""
    from runner.estimate_request import estimate_request

    return estimate_request(spec, gpu=gpu.id, examples=ctx.answers.examples,
                            tokens_per_example=ctx.answers.tokens_per_example)


def evaluate(ctx: Context, rung: str, method: str, s: dict[str, Any], gpu, num_gpus: int) -> tuple[Candidate, Any]:
    """Ask the estimator about one configuration; judge memory and budget; say why in ``verdict``."""
    from estimator import estimate
    from estimator.errors import EstimatorError
    from estimator.notes import LOAD_WHY

    spec = run_spec(ctx, method, s, gpu, num_gpus)
    req = request(ctx, spec, gpu)
    cand = Candidate(rung=rung, method=method, settings=dict(s, sharding=req.sharding),
                     spec=spec.model_dump(mode="json"), request=req.model_dump(mode="json"))
    where = f"{num_gpus}x {gpu.name}"
    try:
        est = estimate(req)
    except EstimatorError as exc:  # a combination the estimator cannot model (e.g. a sharding for this method)
        cand.error = str(exc)
        cand.verdict = f"{method} on {where}: the estimator cannot model it ({exc})"
        return cand, None
    cand.fits = bool(est.fits) and bool(est.eval_fits)  # the eval phase (generation's KV cache) must fit too
    cand.peak_bytes = int(est.memory.peak_bytes)
    cand.gpu_memory_bytes = int(est.gpu.usable_bytes or est.gpu.memory_bytes)  # what a process can fill
    compute = est.compute
    if compute is not None and compute.cost_usd is not None:
        cand.cost_usd = float(compute.cost_usd) * ctx.answers.num_tasks
        cand.hours = float(compute.hours) if compute.hours is not None else None
        cand.within_budget = cand.cost_usd <= ctx.answers.budget_usd
    else:
        cand.within_budget = True
    name = label(cand)
    if est.fits and not est.eval_fits:
        cand.verdict = (f"{name} trains in {gib(cand.peak_bytes)} per GPU but its eval phase needs "
                        f"{gib(est.eval_memory.device_peak_bytes)} ({est.eval_memory.phase}); the {gpu.name} has "
                        f"{gib(est.gpu.usable_bytes)}")
    elif failing := est.failing_phase():  # the step fits, loading does not (QLoRA: MoE experts, unsharded load)
        why = LOAD_WHY.get(est.memory.load_reason, est.memory.load_reason)
        cand.verdict = (f"{name} trains in {gib(cand.peak_bytes)} per GPU but {failing[0]} needs "
                        f"{gib(failing[1])} ({why}); the {gpu.name} has {gib(est.gpu.usable_bytes)}")
    elif not cand.fits:
        on = f" on {num_gpus} GPUs" if num_gpus > 1 else ""
        cand.verdict = (f"{name} needs {gib(cand.peak_bytes)} per GPU{on} ({est.memory.peak_phase}); "
                        f"the {gpu.name} has {gib(cand.gpu_memory_bytes)}")
    elif not cand.within_budget:
        tasks = f" for {ctx.answers.num_tasks} tasks" if ctx.answers.num_tasks > 1 else ""
        cand.verdict = (f"{name} on {where} costs {usd(cand.cost_usd)}{tasks}, above the "
                        f"{usd(ctx.answers.budget_usd)} budget")
    else:
        cand.verdict = (f"{name} on {where} fits: {gib(cand.peak_bytes)} of {gib(cand.gpu_memory_bytes)} per GPU, "
                        f"{usd(cand.cost_usd)}")
    return cand, est


def _rungs(ctx: Context, wanted: str) -> list[tuple[str, str, dict[str, Any], list[tuple[Any, int]]]]:
    """(rung id, method, settings, [(gpu, count), ...]) in ladder order, starting at the wanted method.

    GPUs at hand: the issue's ladder, method first (full -> LoRA -> QLoRA), then memory savers for each method
    in turn (checkpointing, micro-batch 1, ZeRO-3 over the GPUs at hand).
    Renting: the hardware is not fixed, so the method the rules want is kept as long as some catalog GPU (1 to 8
    of them) runs it within the budget: for each method, base -> checkpointing -> micro-batch 1 -> more GPUs with
    ZeRO-3, before moving to the next method.
    """
    from estimator.catalog import list_gpus

    methods = list(LADDER_METHODS[LADDER_METHODS.index(wanted):])
    a = ctx.answers
    if a.rent_in_cloud:
        one = [(g, 1) for g in list_gpus()]
        many = [(g, n) for n in RENT_GPU_COUNTS for g in list_gpus()]
    else:
        one = [(ctx.gpu, a.num_gpus)]
        many = [(ctx.gpu, a.num_gpus)] if a.num_gpus > 1 else []

    per_method = {m: method_rungs(ctx, m, one, many) for m in methods}
    if a.rent_in_cloud:
        return [r for m in methods for r in per_method[m]]
    ordered = [per_method[m][0] for m in methods]
    if methods[0] == "full":  # the lean full regimes come before giving up on full (issue 10)
        ordered[1:1] = [r for r in per_method["full"] if r[0] in LEAN_FULL_RUNGS]
    for rung in ("l_checkpointing", "l_micro_batch", "l_more_gpus"):
        ordered += [r for m in methods for r in per_method[m] if r[0] == rung]
    return ordered


def method_rungs(ctx: Context, m: str, one: list[tuple[Any, int]], many: list[tuple[Any, int]]
                  ) -> list[tuple[str, str, dict[str, Any], list[tuple[Any, int]]]]:
    """One method's rungs in order, each (rung id, method, settings dict, GPU choices): base -> checkpointing ->
    micro-batch 1 (same effective batch) -> ZeRO-3 over more GPUs. Used by the ladder and by the alternatives."""
    base = settings_dict(ctx.settings[m])
    ckpt = dict(base, gradient_checkpointing=True)
    small = dict(ckpt, micro_batch_size=1,  # same effective batch: micro x accumulation is kept
                 gradient_accumulation_steps=ckpt["gradient_accumulation_steps"] * ckpt["micro_batch_size"])
    out = [(f"l_{m}", m, base, one)]
    bf16_cards = [(gpu, count) for gpu, count in one if gpu.bf16_support]  # pure fp16 has no loss scaling
    if m == "full" and bf16_cards:  # pure bf16 + checkpointing, then + 8-bit AdamW: what torchtune / TRL users train in
        pure = dict(ckpt, pure_16bit=True)
        several = any(count > 1 for _, count in bf16_cards)
        # several GPUs: pure bf16 sharded with FSDP; the 8-bit AdamW rung stays unsharded (DDP), since
        # bitsandbytes' 8-bit optimizers do not run under FSDP (bitsandbytes issues #89 and #1633, both open)
        sharded = dict(pure, sharding=PURE_SHARDED) if several else pure
        eight_bit = dict(pure, optimizer="adamw-8bit", sharding="ddp" if several else pure["sharding"])
        out += [("l_pure_bf16", m, sharded, bf16_cards), ("l_pure_bf16_8bit", m, eight_bit, bf16_cards)]
    out.append(("l_checkpointing", m, ckpt, one))
    if base["micro_batch_size"] > 1:
        out.append(("l_micro_batch", m, small, one))
    if many and small["sharding"] != SHARDED:
        out.append(("l_more_gpus", m, dict(small, sharding=SHARDED), many))
    return out


def walk_ladder(ctx: Context, wanted: str) -> tuple[Candidate | None, Any, list[Candidate]]:
    """Try rung after rung; for a rung with several GPU choices (renting) take the cheapest that fits.

    Renting: GPUs are tried largest first, and once one does not fit (memory), smaller ones of the same count are
    skipped: the per-GPU peak of one configuration does not depend on which GPU runs it (bf16 and fp16 are both
    2 bytes), so a smaller card cannot fit what a larger one could not.
    """
    tried: list[Candidate] = []
    for rung, method, s, choices in _rungs(ctx, wanted):
        best: tuple[Candidate, Any] | None = None
        rung_tried = []
        too_small: dict[int, int] = {}  # GPU count -> largest memory (bytes) that did not fit
        for gpu, count in sorted(choices, key=lambda gc: (gc[1], -gc[0].memory_bytes)):
            if gpu.memory_bytes <= too_small.get(count, -1):
                continue
            cand, est = evaluate(ctx, rung, method, s, gpu, count)
            rung_tried.append(cand)
            if cand.error is None and not cand.fits:
                too_small[count] = max(too_small.get(count, -1), gpu.memory_bytes)
            if cand.ok and (best is None or (cand.cost_usd or 0) < (best[0].cost_usd or 0)):
                best = (cand, est)
        if ctx.answers.rent_in_cloud:  # keep the list short: the best of the rung, or its closest miss
            rung_tried = [best[0]] if best else [closest(rung_tried)] if rung_tried else []
        tried += [c for c in rung_tried if c is not None]
        if best is not None:
            return best[0], best[1], tried
    return None, None, tried


def closest(cands: list[Candidate]) -> Candidate | None:
    """The miss that came nearest: fitting but over budget first (cheapest), then the smallest memory overshoot."""
    scored = [c for c in cands if c.error is None and c.peak_bytes]
    if not scored:
        return cands[0] if cands else None
    over_budget = [c for c in scored if c.fits]
    if over_budget:
        return min(over_budget, key=lambda c: c.cost_usd or math.inf)
    return min(scored, key=lambda c: c.peak_bytes / max(c.gpu_memory_bytes or 1, 1))
