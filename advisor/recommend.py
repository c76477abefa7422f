"""Answers -> Recommendation: the seed's rules pick a method and its settings, the estimator's physics checks them.

Flow (each step recorded as a ``Reason``):
1. ``parse_answers``: validate, including the GPU and the model against the catalogs.
2. ``walk_tree``: Q1..Q6 of the seed's decision tree; ``choose_method``: the method the rules want.
3. ``configure``: rank, alpha, targets, learning rate, batch... for every method.
4. Physics: each candidate is the ``RunSpec`` it would launch, estimated through the one spec -> request mapping
   (``runner.estimate_request``), so the figure shown is the figure of the run handed over; a candidate whose
   peak memory does not fit the GPUs,
   or whose cost (all tasks) exceeds the budget, is rejected with the figure. The fallback ladder is walked from
   the wanted method: full -> LoRA -> QLoRA -> + gradient checkpointing -> + micro-batch 1 (same effective
   batch) -> + more GPUs sharded with ZeRO-3. The first rung that fits is the recommendation.
5. If no rung fits, ``NothingFits`` is raised (never a plan that does not fit), with the closest option and
   what it would need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from advisor.answers import Answers, parse_answers
from advisor.errors import AdvisorError
from advisor.facts import GIB, make_facts
from advisor.rules import (
    RuleBook,
    Settings,
    Step,
    TreeNode,
    TreeOption,
    choose_method,
    configure,
    load_rules,
    matrix_rows,
    tree_steps,
    walk_tree,
    warnings_for,
)

MethodName = Literal["full", "lora", "qlora"]
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


class NothingFits(AdvisorError):
    """No rung of the fallback ladder fits the GPUs and the budget. ``result`` says what came closest."""

    def __init__(self, message: str, result: "NoFit"):
        super().__init__(message, field="gpu")
        self.result = result


class Reason(Step):
    """One step of the path taken: the question, the user's answer, the rule (with its seed section), the effect."""

    kind: Literal["tree", "method", "matrix", "config", "physics", "conflict"] = "tree"


class Alternative(BaseModel):
    """Another method, with its own figures and why it was not chosen.

    The figures are of one configuration, named in ``knobs``: the method's own first fitting rung of the ladder
    (``at="own_rung"``) or the recommendation's knobs (``at="winner_knobs"``: checkpointing, micro-batch x
    accumulation, sharding). A lighter method is never shown needing more than a heavier one because of
    different knobs: such a pair is shown at the winner's knobs.
    """

    method: MethodName
    rank: int | None
    at: Literal["own_rung", "winner_knobs"] = Field(description="which configuration the figures are of")
    knobs: str = Field(description="that configuration's knobs, e.g. 'checkpointing, micro-batch 4x4'")
    fits: bool = Field(description="peak memory fits the GPUs")
    within_budget: bool | None = Field(description="cost of all tasks within the budget (None: no cost figure)")
    peak_bytes: int | None
    gpu_memory_bytes: int | None
    gpu: str | None
    num_gpus: int | None
    cost_usd: float | None = Field(description="estimated cost of all tasks, USD")
    hours: float | None = Field(description="estimated wall-clock hours for one task")
    storage_bytes: int | None = Field(description="disk for all tasks: full copies or base + adapters")
    why_not: str


class Candidate(BaseModel):
    """One configuration the ladder tried, with the estimator's answer."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    rung: str
    method: MethodName
    settings: dict[str, Any]
    spec: dict[str, Any] = Field(description="the RunSpec this candidate launches (dataset path chosen at launch)")
    request: dict[str, Any] = Field(description="runner.estimate_request.estimate_request(spec) as JSON")
    fits: bool = False
    within_budget: bool = False
    peak_bytes: int | None = None
    gpu_memory_bytes: int | None = None
    cost_usd: float | None = None
    hours: float | None = None
    error: str | None = None
    verdict: str = ""

    @property
    def ok(self) -> bool:
        return self.fits and self.within_budget and self.error is None


class NoFit(BaseModel):
    """The explicit 'nothing fits' answer: what was tried, what came closest, what it would need."""

    fits: Literal[False] = False
    message: str
    closest: Candidate | None
    needed: list[str]
    tried: list[Candidate]
    reasons: list[Reason]


class Recommendation(BaseModel):
    """A configuration that fits the GPUs and the budget, with the path that led to it."""

    fits: Literal[True] = True
    model: str
    method: MethodName
    rank: int | None = Field(description="LoRA rank; None for full fine-tuning")
    alpha: float | None
    dropout: float | None
    target_modules: str | list[str] | None
    rslora: bool
    dora: bool
    quantization: Literal["none", "nf4"]
    optimizer: str
    learning_rate: float
    epochs: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    seq_len: int
    dtype: Literal["bf16", "fp16", "fp32"]
    sharding: str
    num_gpus: int
    gpu: str
    cost_usd: float | None = Field(description="estimated cost of all tasks, USD")
    estimate: dict[str, Any] = Field(description="the estimator's JSON (Estimate.to_json) plus memory breakdown")
    storage: dict[str, Any] = Field(default_factory=dict, description="storage for the N tasks (estimator)")
    request: dict[str, Any] = Field(description="the EstimateRequest behind the estimate (mapped from run_spec)")
    run_spec: dict[str, Any] = Field(description="the RunSpec the estimate is of; to_run_spec adds the dataset")
    reasons: list[Reason]
    alternatives: list[Alternative]
    warnings: list[str]
    decision_path: list[TreeNode] = Field(description="Q1..Q6, the method rule and the physics ladder, as a tree")
    answers: Answers

    def estimate_request(self):
        """The EstimateRequest that produced ``estimate`` (re-estimate to check it)."""
        from estimator.request import EstimateRequest

        return EstimateRequest.model_validate(self.request)

    def to_run_spec(self, dataset_path: str, **overrides):
        """The RunSpec whose estimate this is, training on ``dataset_path``; ``overrides`` replace top-level fields
        (an override of a modelled field changes the run, so re-estimate it)."""
        from runner.spec import RunSpec

        data = dict(self.run_spec, dataset=dict(self.run_spec["dataset"], path=str(dataset_path)))
        data.update(overrides)
        return RunSpec.model_validate(data)


# ------------------------------------------------------------------------------------------------ helpers
def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _usd(x: float | None) -> str:
    if x is None:
        return "?"
    return f"${x:.4f}" if 0 < x < 0.01 else (f"${x:,.2f}" if x < 100 else f"${x:,.0f}")


def model_total_params(entry) -> int:
    """Total parameters (count): the catalog's published figure, else counted on the meta model."""
    if entry.published_params:
        return int(entry.published_params)
    from estimator.params import build_meta_model, count_parameters

    return count_parameters(build_meta_model(entry.config)).total


def _dtype_for(gpu) -> str:
    # Seed, "For Full Fine-Tuning" / Mixed Precision: "fp16=True,  # For older GPUs", "bf16=True,  # For A100s".
    return "bf16" if gpu.bf16_support else "fp16"


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None


class _Context(BaseModel):
    """Everything the physics loop needs, computed once."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    answers: Answers
    book: Any
    facts: dict[str, Any]
    settings: dict[str, Settings]
    seq_len: int
    gpu: Any | None  # estimator.catalog.GPU or None when renting


def _settings_dict(settings: Settings) -> dict[str, Any]:
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


def _distribution(num_gpus: int, sharding: str | None):
    """The launch layout of ``num_gpus`` ranks: one node while DistributionSpec allows it, else nodes of the
    largest divisor of the count up to GPUS_PER_NODE."""
    from runner.spec import DistributionSpec

    per_node = num_gpus
    if num_gpus > MAX_NPROC_PER_NODE:
        per_node = max(d for d in range(1, GPUS_PER_NODE + 1) if num_gpus % d == 0)
    return DistributionSpec(nproc_per_node=per_node, nnodes=num_gpus // per_node,
                            strategy=RUN_STRATEGY[sharding or "ddp"])


def _run_spec(ctx: _Context, method: str, s: dict[str, Any], gpu, num_gpus: int):
    """The RunSpec one candidate launches: the rung's settings ``s`` (``_settings_dict`` keys) for ``method`` on
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
    and one process or DDP (FSDP and ZeRO keep their own fp32 master weights); else fp32 master weights."""
    pure = s.get("pure_16bit") and method == "full" and gpu.bf16_support
    if pure and (dist.world_size == 1 or dist.strategy == "ddp"):
        return "bf16"
    return "fp32"


def _request(ctx: _Context, spec, gpu):
    """The estimate of ``spec`` on ``gpu`` with the answers' data size: the one mapping, as every caller uses it."""
    from runner.estimate_request import estimate_request

    return estimate_request(spec, gpu=gpu.id, examples=ctx.answers.examples,
                            tokens_per_example=ctx.answers.tokens_per_example)


def _evaluate(ctx: _Context, rung: str, method: str, s: dict[str, Any], gpu, num_gpus: int) -> tuple[Candidate, Any]:
    """Ask the estimator about one configuration; judge memory and budget; say why in ``verdict``."""
    from estimator import estimate
    from estimator.errors import EstimatorError

    spec = _run_spec(ctx, method, s, gpu, num_gpus)
    req = _request(ctx, spec, gpu)
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
    label = _label(method, s)
    if est.fits and not est.eval_fits:
        cand.verdict = (f"{label} trains in {_gib(cand.peak_bytes)} per GPU but its eval phase needs "
                        f"{_gib(est.eval_memory.device_peak_bytes)} ({est.eval_memory.phase}); the {gpu.name} has "
                        f"{_gib(est.gpu.usable_bytes)}")
    elif not cand.fits:
        on = f" on {num_gpus} GPUs" if num_gpus > 1 else ""
        cand.verdict = (f"{label} needs {_gib(cand.peak_bytes)} per GPU{on} ({est.memory.peak_phase}); "
                        f"the {gpu.name} has {_gib(cand.gpu_memory_bytes)}")
    elif not cand.within_budget:
        tasks = f" for {ctx.answers.num_tasks} tasks" if ctx.answers.num_tasks > 1 else ""
        cand.verdict = (f"{label} on {where} costs {_usd(cand.cost_usd)}{tasks}, above the "
                        f"{_usd(ctx.answers.budget_usd)} budget")
    else:
        cand.verdict = (f"{label} on {where} fits: {_gib(cand.peak_bytes)} of {_gib(cand.gpu_memory_bytes)} per GPU, "
                        f"{_usd(cand.cost_usd)}")
    return cand, est


def _label(method: str, s: dict[str, Any]) -> str:
    name = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[method]
    bits = []
    if s.get("rank"):
        bits.append(f"r={s['rank']}")
    if s.get("pure_16bit"):
        bits.append("pure bf16")
    if s.get("gradient_checkpointing"):
        bits.append("checkpointing")
    if s.get("optimizer") in ("adamw-8bit", "paged-adamw-8bit"):
        bits.append("8-bit AdamW")
    bits.append(f"micro-batch {s['micro_batch_size']}x{s['gradient_accumulation_steps']}")
    if s.get("sharding") in ("zero3", "fsdp"):
        bits.append(s["sharding"].upper() if s["sharding"] == "fsdp" else "ZeRO-3")
    return f"{name} ({', '.join(bits)})"


def _rungs(ctx: _Context, wanted: str) -> list[tuple[str, str, dict[str, Any], list[tuple[Any, int]]]]:
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

    per_method = {m: _method_rungs(ctx, m, one, many) for m in methods}
    if a.rent_in_cloud:
        return [r for m in methods for r in per_method[m]]
    ordered = [per_method[m][0] for m in methods]
    if methods[0] == "full":  # the lean full regimes come before giving up on full (issue 10)
        ordered[1:1] = [r for r in per_method["full"] if r[0] in LEAN_FULL_RUNGS]
    for rung in ("l_checkpointing", "l_micro_batch", "l_more_gpus"):
        ordered += [r for m in methods for r in per_method[m] if r[0] == rung]
    return ordered


def _method_rungs(ctx: _Context, m: str, one: list[tuple[Any, int]], many: list[tuple[Any, int]]
                  ) -> list[tuple[str, str, dict[str, Any], list[tuple[Any, int]]]]:
    """One method's rungs in order, each (rung id, method, settings dict, GPU choices): base -> checkpointing ->
    micro-batch 1 (same effective batch) -> ZeRO-3 over more GPUs. Used by the ladder and by the alternatives."""
    base = _settings_dict(ctx.settings[m])
    ckpt = dict(base, gradient_checkpointing=True)
    small = dict(ckpt, micro_batch_size=1,  # same effective batch: micro x accumulation is kept
                 gradient_accumulation_steps=ckpt["gradient_accumulation_steps"] * ckpt["micro_batch_size"])
    out = [(f"l_{m}", m, base, one)]
    if m == "full":  # pure bf16 + checkpointing, then + 8-bit AdamW: what torchtune / TRL users train in
        pure = dict(ckpt, pure_16bit=True)
        out += [("l_pure_bf16", m, pure, one), ("l_pure_bf16_8bit", m, dict(pure, optimizer="adamw-8bit"), one)]
    out.append(("l_checkpointing", m, ckpt, one))
    if base["micro_batch_size"] > 1:
        out.append(("l_micro_batch", m, small, one))
    if many and small["sharding"] != SHARDED:
        out.append(("l_more_gpus", m, dict(small, sharding=SHARDED), many))
    return out


def _walk_ladder(ctx: _Context, wanted: str) -> tuple[Candidate | None, Any, list[Candidate]]:
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
            cand, est = _evaluate(ctx, rung, method, s, gpu, count)
            rung_tried.append(cand)
            if cand.error is None and not cand.fits:
                too_small[count] = max(too_small.get(count, -1), gpu.memory_bytes)
            if cand.ok and (best is None or (cand.cost_usd or 0) < (best[0].cost_usd or 0)):
                best = (cand, est)
        if ctx.answers.rent_in_cloud:  # keep the list short: the best of the rung, or its closest miss
            rung_tried = [best[0]] if best else [_closest(rung_tried)] if rung_tried else []
        tried += [c for c in rung_tried if c is not None]
        if best is not None:
            return best[0], best[1], tried
    return None, None, tried


def _closest(cands: list[Candidate]) -> Candidate | None:
    """The miss that came nearest: fitting but over budget first (cheapest), then the smallest memory overshoot."""
    scored = [c for c in cands if c.error is None and c.peak_bytes]
    if not scored:
        return cands[0] if cands else None
    over_budget = [c for c in scored if c.fits]
    if over_budget:
        return min(over_budget, key=lambda c: c.cost_usd or math.inf)
    return min(scored, key=lambda c: c.peak_bytes / max(c.gpu_memory_bytes or 1, 1))


# ------------------------------------------------------------------------------------------------ main entry
def recommend(answers: Answers | dict[str, Any]) -> Recommendation:
    """The recommendation for these answers; raises ``AdvisorError`` for bad answers, ``NothingFits`` when no
    configuration fits the GPUs and the budget."""
    from estimator.catalog import get_gpu, resolve_model

    answers = parse_answers(answers)
    book = load_rules()
    entry = resolve_model(answers.model)
    gpu = None if answers.rent_in_cloud else get_gpu(answers.gpu)
    facts = make_facts(
        answers,
        model_params=model_total_params(entry),
        gpu_memory_bytes=gpu.memory_bytes if gpu else None,
        gpu_kind=gpu.kind if gpu else None,
    )
    warnings: list[str] = []
    reasons: list[Reason] = []

    seq_len = answers.tokens_per_example
    max_pos = _max_positions(entry.config)
    if max_pos and seq_len > max_pos:
        warnings.append(f"tokens_per_example {seq_len:,} is longer than {entry.display_name}'s context "
                        f"({max_pos:,} positions): sequences are truncated to {max_pos:,} tokens")
        seq_len = max_pos

    # 1. the seed's decision tree and the method the rules want
    nodes = walk_tree(facts, book)
    reasons += [Reason(kind="tree", **s.model_dump()) for s in tree_steps(nodes, book)]
    method_rule, method_step = choose_method(facts, book)
    reasons.append(Reason(kind="method", **method_step.model_dump()))
    wanted = method_rule.method
    for row in matrix_rows(facts, book):
        rank = "" if not row.rank else (f", r={row.rank[0]}" if row.rank[0] == row.rank[1]
                                        else f", r={row.rank[0]}-{row.rank[1]}")
        reasons.append(Reason(kind="matrix", question="Which row of the Quick Selection Matrix matches?",
                              answer=row.situation, rule=row.id, section=row.section, quote=row.quote,
                              effect=f"the matrix says {row.method}{rank}"))

    # 2. settings per method
    settings: dict[str, Settings] = {}
    config_steps: dict[str, list[Step]] = {}
    for m in LADDER_METHODS:
        settings[m], config_steps[m] = configure(facts, m, book)
    ctx = _Context(answers=answers, book=book, facts=facts, settings=settings, seq_len=seq_len, gpu=gpu)

    # 3. physics: walk the ladder from the wanted method
    chosen, est, tried = _walk_ladder(ctx, wanted)
    ladder_reasons = [_budget_reason(answers)] + _ladder_reasons(book, tried, chosen)
    if chosen is None:
        raise _nothing_fits(ctx, wanted, tried, reasons + ladder_reasons)
    method = chosen.method
    s = chosen.settings
    reasons += [Reason(kind="config", **st.model_dump()) for st in config_steps[method]]
    reasons += ladder_reasons

    # 4. warnings: rule warnings on the final configuration, conflicts, physics trade-offs
    final_facts = {**facts, **settings[method].values, "rank": s["rank"] or 0,
                   "target_modules": s["target_modules"] or ""}
    warnings += [w.message for w in warnings_for(final_facts, method, book)]
    conflict_reasons, conflict_warnings = _conflicts(nodes, method_rule, method, wanted, tried, answers, chosen)
    reasons += conflict_reasons
    warnings += conflict_warnings
    if gpu is not None and not gpu.bf16_support:
        warnings.append(f"The {gpu.name} has no bf16: the run uses fp16 mixed precision (seed: 'fp16=True,  # For "
                        f"older GPUs'), which can overflow; watch for NaN losses.")

    from estimator import storage_for_tasks

    estimate_json = _estimate_json(est)
    storage = storage_for_tasks(est, answers.num_tasks)
    alternatives = _alternatives(ctx, method, wanted, tried, chosen)
    req = chosen.request
    from runner.spec import RunSpec

    spec = RunSpec.model_validate(chosen.spec)  # the settings shown are read back from the run handed over
    adapter = method != "full"

    return Recommendation(
        model=spec.model,
        method=spec.method,
        rank=spec.peft.r if adapter else None,
        alpha=spec.peft.alpha if adapter else None,
        dropout=spec.peft.dropout if adapter else None,
        target_modules=spec.peft.target_modules if adapter else None,
        rslora=spec.peft.use_rslora,
        dora=spec.peft.use_dora,
        quantization=spec.quantization,
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        epochs=spec.epochs,
        micro_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        gradient_checkpointing=spec.gradient_checkpointing,
        seq_len=spec.seq_len,
        dtype=spec.precision,
        sharding=req["sharding"],
        num_gpus=spec.distribution.world_size,
        gpu=req["gpu"],
        cost_usd=chosen.cost_usd,
        estimate=estimate_json,
        storage=storage,
        request=req,
        run_spec=chosen.spec,
        reasons=reasons,
        alternatives=alternatives,
        warnings=warnings,
        decision_path=_decision_path(nodes, method_rule, book, tried, chosen),
        answers=answers,
    )


def _estimate_json(est) -> dict[str, Any]:
    """``Estimate.to_json()``: the estimate nested as the CLI prints it (``["memory"]["peak_bytes"]``, ``["gpu"]``,
    ``["compute"]``, ``["model"]``)."""
    return est.to_json()


def _budget_reason(answers: Answers) -> Reason:
    tasks = f" x {answers.num_tasks} tasks" if answers.num_tasks > 1 else ""
    return Reason(
        kind="physics",
        question="How is the budget checked?",
        answer=f"budget {_usd(answers.budget_usd)}",
        rule="budget",
        section="Real Cost Comparison",
        quote="1× RTX 4090 (24GB) - owned or $2/hour cloud",
        effect=(f"estimated cost = GPU-hours x the catalog's price per GPU-hour{tasks}; GPUs you own are priced "
                f"as if rented, as the seed's cost comparison does"),
    )


def _ladder_reasons(book: RuleBook, tried: list[Candidate], chosen: Candidate | None) -> list[Reason]:
    rungs = {r.id: r for r in book.ladder}
    out = []
    for cand in tried:
        rung = rungs[cand.rung]
        req = cand.request
        out.append(Reason(
            kind="physics",
            question=f"Does {rung.label} fit {req['num_gpus']}x {req['gpu']} and the budget?",
            answer=cand.verdict,
            rule=rung.id,
            section=rung.section,
            quote=rung.quote,
            effect="chosen" if cand is chosen else ("rejected: " + ("over budget" if cand.fits and not cand.error
                                                                    else "does not fit" if not cand.error
                                                                    else "cannot be estimated")),
        ))
    return out


def _conflicts(nodes: list[TreeNode], method_rule, method: str, wanted: str, tried: list[Candidate],
               answers: Answers, chosen: Candidate | None = None) -> tuple[list[Reason], list[str]]:
    """Questions of the tree that lean away from the final method, and physics overriding the rules."""
    reasons, warnings = [], []
    family = {"full": {"full"}, "lora": {"lora", "qlora"}, "qlora": {"lora", "qlora"}}
    for node in nodes:
        if node.strong and not (set(node.leans) & family[method]):
            text = (f"Conflict: {node.question} ({node.answer}: '{node.chosen}') leans to {' / '.join(node.leans)}, "
                    f"but {method} was chosen")
            if method == wanted:
                text += f" because rule {method_rule.id} ({method_rule.because}) comes first"
                if chosen is not None:
                    text += f"; the estimate backs it: {chosen.verdict}"
            else:
                text += " because the estimator's figures ruled out the methods above it"
            reasons.append(Reason(kind="conflict", question=node.question, answer=node.answer, rule=node.rule or "",
                                  section=node.section or "", quote="", effect=text))
            warnings.append(text + ".")
    if method != wanted:
        first = next((c for c in tried if c.method == wanted), None)
        why = first.verdict if first else f"{wanted} could not be estimated"
        trade = {
            ("full", "lora"): "an adapter instead of all weights: the seed puts LoRA at 95-99% of full fine-tuning "
                              "(usually < 1-3% lower), with less forgetting",
            ("full", "qlora"): "a 4-bit base with an adapter instead of all weights: lower peak accuracy than full "
                               "fine-tuning (the seed: LoRA 95-99% of full) and slower steps from dequantization",
            ("lora", "qlora"): "the base is stored in 4-bit NF4: less memory, slightly slower steps, a small "
                               "quality cost",
        }.get((wanted, method), "a lighter configuration")
        text = (f"Trade-off: the rules want {wanted} ({method_rule.because}), but {why}. Recommending {method}: "
                f"{trade}.")
        if wanted == "full" and answers.accuracy_pct > 98:
            text += (f" Your {answers.accuracy_pct:g}% target may not be met; the seed's way to close the gap is a "
                     f"higher rank (r=64-128) and DoRA, which this plan uses, or a larger budget/more GPUs for full "
                     f"fine-tuning.")
        reasons.append(Reason(kind="conflict", question="Do the estimator's figures allow the method the rules want?",
                              answer=why, rule="physics", section="Decision Framework", quote="", effect=text))
        warnings.append(text)
    return reasons, warnings


_SHARDING_LABEL = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP"}


def _knob_values(cand: Candidate) -> tuple:
    return tuple(cand.settings.get(k) for k in KNOBS)


def _knobs_text(cand: Candidate) -> str:
    """The memory knobs of a candidate in words: 'checkpointing, micro-batch 4x4' (+ the sharding on >1 GPU)."""
    s = cand.settings
    bits = ["checkpointing" if s.get("gradient_checkpointing") else "no checkpointing",
            f"micro-batch {s['micro_batch_size']}x{s['gradient_accumulation_steps']}"]
    if cand.request["num_gpus"] > 1:
        bits.append(_SHARDING_LABEL.get(s.get("sharding"), str(s.get("sharding"))))
    if cand.method == "full" and s.get("pure_16bit"):  # the lean full rungs' regime (their own knobs)
        bits.append("pure bf16" + (", 8-bit AdamW" if s.get("optimizer") in ("adamw-8bit", "paged-adamw-8bit")
                                   else ""))
    return ", ".join(bits)


@dataclass
class _Shown:
    """One alternative method: its own first fitting rung (if any), at the winner's knobs, and which is shown."""

    own: tuple[Candidate, Any] | None
    winner: tuple[Candidate, Any]
    at: Literal["own_rung", "winner_knobs"]

    @property
    def pick(self) -> tuple[Candidate, Any]:
        return self.own if self.at == "own_rung" and self.own is not None else self.winner


def _alternatives(ctx: _Context, method: str, wanted: str, tried: list[Candidate],
                  chosen: Candidate) -> list[Alternative]:
    """The other methods on the chosen GPUs, each at its own first fitting rung of the ladder (base ->
    checkpointing -> micro-batch 1 -> ZeRO-3), or at the recommendation's knobs when it fits no rung, or when
    its own rung would show a lighter method (QLoRA < LoRA < full) needing more memory than a heavier one."""
    from estimator.catalog import get_gpu

    gpu = get_gpu(chosen.request["gpu"])
    count = chosen.request["num_gpus"]
    here = [(gpu, count)]
    shown: dict[str, _Shown] = {}
    for m in LADDER_METHODS:
        if m == method:
            continue
        ok = first_fit = None
        for rung, _, s, _ in _method_rungs(ctx, m, here, here if count > 1 else []):
            cand, est = _evaluate(ctx, rung, m, s, gpu, count)
            if cand.ok:
                ok = (cand, est)
                break
            if cand.fits and cand.error is None and first_fit is None:
                first_fit = (cand, est)  # fits the memory, over the budget: kept unless a later rung is in budget
        own = ok or first_fit
        at_winner = dict(_settings_dict(ctx.settings[m]), **{k: chosen.settings[k] for k in KNOBS})
        shown[m] = _Shown(own=own, winner=_evaluate(ctx, "winner_knobs", m, at_winner, gpu, count),
                          at="own_rung" if own is not None else "winner_knobs")
    _keep_memory_order(method, chosen, shown)

    from estimator import storage_for_tasks

    out = []
    for m, sh in shown.items():
        cand, est = sh.pick
        storage = _storage_bytes(storage_for_tasks(est, ctx.answers.num_tasks), m) if est is not None else None
        out.append(Alternative(
            method=m, rank=cand.settings["rank"], at=sh.at, knobs=_knobs_text(cand), fits=cand.fits,
            within_budget=cand.within_budget if cand.cost_usd else None, peak_bytes=cand.peak_bytes,
            gpu_memory_bytes=cand.gpu_memory_bytes, gpu=gpu.id, num_gpus=count, cost_usd=cand.cost_usd,
            hours=cand.hours, storage_bytes=storage, why_not=_why_not(ctx, m, method, wanted, chosen, sh, gpu.name),
        ))
    return out


def _keep_memory_order(method: str, chosen: Candidate, shown: dict[str, _Shown]) -> None:
    """Where a lighter method would be shown needing more memory than a heavier one at different knobs, show the
    alternatives of that pair at the recommendation's knobs instead (at equal knobs the figures are physics)."""
    for _ in LADDER_METHODS:  # each pass moves at least one alternative to the winner's knobs, or stops
        def cand_of(m: str) -> Candidate:
            return chosen if m == method else shown[m].pick[0]

        moved = False
        for i, heavy in enumerate(LADDER_METHODS):
            for light in LADDER_METHODS[i + 1:]:
                h, lt = cand_of(heavy), cand_of(light)
                if h.peak_bytes is None or lt.peak_bytes is None or lt.peak_bytes <= h.peak_bytes:
                    continue
                if _knob_values(h) == _knob_values(lt):
                    continue
                for m in (heavy, light):
                    if m != method and shown[m].at == "own_rung":
                        shown[m].at = "winner_knobs"
                        moved = True
        if not moved:
            return


def _why_not(ctx: _Context, m: str, method: str, wanted: str, chosen: Candidate, sh: _Shown, gpu_name: str) -> str:
    """Why the alternative ``m`` was not recommended, opening with which configuration its figures are of."""
    cand, _ = sh.pick
    same = _knob_values(cand) == _knob_values(chosen)
    if sh.at == "own_rung":
        where = f"At its own first fitting rung ({_knobs_text(cand)}" + (
            ", the recommendation's knobs)" if same else ")")
    else:
        where = f"At the recommendation's knobs ({_knobs_text(cand)})"
    if cand.error:
        return f"{where}: {cand.verdict}"
    if not cand.fits or not cand.within_budget:
        why = f"{where}: rejected: {cand.verdict}"
        own = sh.own[0] if sh.own is not None else None
        if sh.at == "winner_knobs" and own is not None and own.ok:
            why += (f". At its own first fitting rung ({_knobs_text(own)}) it fits ({_gib(own.peak_bytes)}, "
                    f"{_usd(own.cost_usd)}), but the ladder tried {_label(method, chosen.settings)} first")
        elif sh.at == "winner_knobs" and own is None and not cand.fits:
            why += f". It fits no rung of the ladder on {cand.request['num_gpus']}x {gpu_name}"
        return why
    if LADDER_METHODS.index(m) < LADDER_METHODS.index(wanted):
        return f"{where}: fits ({cand.verdict}), but the rules did not ask for it: {_rules_prefer(wanted, ctx)}"
    if LADDER_METHODS.index(m) > LADDER_METHODS.index(method):
        return (f"{where}: also fits ({cand.verdict}), but {method} "
                + ("is what the rules want, and it fits" if method == wanted else
                   "fits too and is higher on the ladder (fewer trade-offs in quality)"))
    return (f"{where}: fits ({cand.verdict}), but the ladder tried {_label(method, chosen.settings)} first "
            f"(it changes the method before it trades compute for memory)")


def _rules_prefer(wanted: str, ctx: _Context) -> str:
    return {"lora": "the seed makes LoRA the default and nothing here calls for full fine-tuning",
            "qlora": "the rules picked QLoRA for this deployment/model size"}.get(wanted, "")


def _storage_bytes(storage: dict, method: str) -> int | None:
    """Disk for all tasks from the estimator's storage dict (keys differ by version: take the method's own)."""
    keys = ["full_checkpoints_bytes"] if method == "full" else ["base_plus_adapters_bytes"]
    for key in keys:
        if isinstance(storage.get(key), (int, float)):
            return int(storage[key])
    return None


def _decision_path(nodes: list[TreeNode], method_rule, book: RuleBook, tried: list[Candidate],
                   chosen: Candidate | None) -> list[TreeNode]:
    path = list(nodes)
    path.append(TreeNode(
        id="method",
        question="Which method do the seed's rules want?",
        answer=method_rule.because,
        options=[TreeOption(label=f"{r.method} ({r.id})", leans=[r.method], chosen=r is method_rule)
                 for r in book.method_rules],
        chosen=f"{method_rule.method} ({method_rule.id})",
        rule=method_rule.id, section=method_rule.section, leans=[method_rule.method], strong=True,
    ))
    labels = []
    for cand in tried:
        label = f"{_label(cand.method, cand.settings)} on {cand.request['num_gpus']}x {cand.request['gpu']}"
        labels.append((label, cand is chosen, cand.method))
    path.append(TreeNode(
        id="physics",
        question="Does it fit the GPUs and the budget? (fallback ladder)",
        answer=chosen.verdict if chosen else "nothing fits",
        options=[TreeOption(label=lbl, leans=[m], chosen=c) for lbl, c, m in labels],
        chosen=next((lbl for lbl, c, _ in labels if c), None),
        rule=chosen.rung if chosen else None, leans=[chosen.method] if chosen else [],
    ))
    return path


def _nothing_fits(ctx: _Context, wanted: str, tried: list[Candidate], reasons: list[Reason]) -> NothingFits:
    """Build the explicit 'nothing fits' answer: the closest miss and what would make it fit."""
    closest = _closest(tried)
    needed: list[str] = []
    a = ctx.answers
    if closest is not None and closest.error is None and closest.peak_bytes:
        if not closest.fits:
            needed += _what_would_fit(ctx, closest)
        if closest.cost_usd is not None and closest.cost_usd > a.budget_usd:
            needed.append(f"a budget of at least {_usd(closest.cost_usd)} (you gave {_usd(a.budget_usd)}) for "
                          f"{closest.method}" + (f" over {a.num_tasks} tasks" if a.num_tasks > 1 else ""))
    if a.examples * a.tokens_per_example * a.epochs > 0 and closest and closest.cost_usd and \
            closest.cost_usd > a.budget_usd:
        needed.append("or fewer examples / epochs / tokens per example, which lowers the cost in proportion")
    where = "any catalog GPU (1-8)" if a.rent_in_cloud else f"{a.num_gpus}x {a.gpu}"
    message = (f"nothing fits: no rung of the fallback ladder (from {wanted} down to QLoRA with checkpointing, "
               f"micro-batch 1 and sharding) fits {where} within the {_usd(a.budget_usd)} budget")
    if closest is not None:
        message += f"\nclosest: {closest.verdict}"
    if needed:
        message += "\nwhat would make it fit: " + "; ".join(needed)
    return NothingFits(message, NoFit(message=message, closest=closest, needed=needed, tried=tried, reasons=reasons))


def _what_would_fit(ctx: _Context, cand: Candidate) -> list[str]:
    """For a configuration that does not fit: more of the same GPU with ZeRO-3, or a bigger catalog GPU."""
    from estimator import estimate, min_gpus
    from estimator.catalog import get_gpu, list_gpus
    from estimator.errors import EstimatorError
    from estimator.request import EstimateRequest

    out = []
    req = EstimateRequest.model_validate(cand.request)
    try:
        n = min_gpus(EstimateRequest.model_validate(
            dict(cand.request, sharding=SHARDED, num_gpus=max(req.num_gpus, 2))))
    except EstimatorError:
        n = None
    gpu = get_gpu(req.gpu)
    if n and n > req.num_gpus:
        out.append(f"{n}x {gpu.name} with ZeRO-3 for {cand.method}")
    for other in list_gpus():
        if other.memory_bytes <= gpu.memory_bytes:
            continue
        try:  # the same run on the other GPU: its precision follows the GPU (bf16 or fp16)
            est = estimate(_request(ctx, _run_spec(ctx, cand.method, cand.settings, other, req.num_gpus), other))
        except EstimatorError:
            continue
        if est.fits:
            out.append(f"one {other.name} ({_gib(other.memory_bytes)}) for {cand.method}: peak "
                       f"{_gib(est.memory.peak_bytes)}")
            break
    return out
