"""What the advisor answers: a ``Recommendation`` that fits, or ``NothingFits`` with the closest ``NoFit``; the
``Candidate`` configurations the ladder tried, the ``Alternative`` methods shown, and the ``Reason`` steps."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from advisor.answers import Answers
from advisor.errors import AdvisorError
from advisor.rules import MethodName, Step, TreeNode


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
    knobs: str = Field(description="that configuration's knobs, e.g. 'checkpointing, micro-batch 4x4, 8-bit AdamW' "
                                   "(advisor.labels.knobs_text, as in its why_not)")
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
