"""The advisor's questionnaire: what the user knows about their situation, each question with help text.

``Answers(...)`` validates field by field (pydantic collects every error of one form at once);
``parse_answers(data)`` does the same and also checks the GPU and the model against the catalogs, turning
all problems into one ``AdvisorError`` whose lines name the field and the fix.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from advisor.errors import AdvisorError

Deployment = Literal["edge", "cloud", "on-prem"]
Continual = Literal["none", "sequential", "critical"]
Complexity = Literal["simple", "summarization", "reasoning", "coding"]
Domain = Literal["close", "different"]

# Defaults: the seed's running example ("Real Cost Comparison": LLaMA-2-7B, 3 epochs, 10,000 examples, one
# RTX 4090) with the seed's SFT sequence length (Practice 2: max_seq_length=512).
DEFAULT_MODEL = "llama-2-7b"
DEFAULT_GPU = "rtx-4090"
DEFAULT_EXAMPLES = 10_000
DEFAULT_TOKENS_PER_EXAMPLE = 512
DEFAULT_EPOCHS = 3.0
# Bounds that only catch typos: more GPUs than any single training job uses, sequences longer than any context.
MAX_GPUS = 4096
MAX_TOKENS_PER_EXAMPLE = 1_048_576
MIN_TOKENS_PER_EXAMPLE = 8  # runner.spec.RunSpec.seq_len's lower bound


class Answers(BaseModel):
    """The questionnaire. Every field has a default, so an empty form is a valid (typical) situation."""

    model_config = ConfigDict(extra="forbid")

    budget_usd: float = Field(
        1000.0, ge=0, description="Training budget in US dollars for all tasks together (GPU-hours at catalog price)."
    )
    rent_in_cloud: bool = Field(
        False, description="Rent GPUs in the cloud: the advisor picks the GPU type and count from the catalog by price."
    )
    gpu: str | None = Field(
        DEFAULT_GPU, description="The GPU you have (catalog id, see `ftadvisor gpus`); ignored when renting."
    )
    num_gpus: int = Field(1, ge=1, le=MAX_GPUS, description="How many of that GPU you have (1 or more).")
    num_tasks: int = Field(
        1, ge=1, le=100_000, description="How many different tasks/domains need their own fine-tuned model."
    )
    accuracy_pct: float = Field(
        90.0, gt=0, le=100, description="Accuracy you need, in percent of the best possible (e.g. 94, 98.5)."
    )
    deployment: Deployment = Field("cloud", description="Where the model will run: edge device, cloud or on-prem.")
    rapid_updates: bool = Field(False, description="You need fast iteration / frequent model updates (A/B tests).")
    continual: Continual = Field(
        "none",
        description="Continual learning: none, sequential tasks over time, or critical to avoid forgetting.",
    )
    model: str = Field(DEFAULT_MODEL, min_length=1, description="Model: catalog id, config.json path or model folder.")
    examples: int = Field(DEFAULT_EXAMPLES, ge=1, description="Training examples per task.")
    tokens_per_example: int = Field(
        DEFAULT_TOKENS_PER_EXAMPLE,
        ge=MIN_TOKENS_PER_EXAMPLE,
        le=MAX_TOKENS_PER_EXAMPLE,
        description="Typical tokens per example (prompt + answer); sets the sequence length.",
    )
    complexity: Complexity = Field(
        "summarization",
        description="Task complexity: simple (sentiment), summarization, reasoning, coding.",
    )
    domain: Domain = Field("close", description="How far the domain is from pre-training: close or very different.")
    epochs: float = Field(DEFAULT_EPOCHS, gt=0, le=1000, description="Passes over the data (the seed uses 3).")

    @model_validator(mode="after")
    def _need_gpu(self):
        if not self.rent_in_cloud and not self.gpu:
            raise ValueError("gpu: name the GPU you have (catalog id, see `ftadvisor gpus`) or set rent_in_cloud")
        return self


# What to do about a bad value, per field (shown after pydantic's own message).
FIXES = {
    "budget_usd": "give the budget in US dollars, 0 or more",
    "gpu": "use a catalog GPU id (see `ftadvisor gpus`), or set rent_in_cloud",
    "num_gpus": f"give the number of GPUs, 1 to {MAX_GPUS}",
    "num_tasks": "give the number of tasks, 1 or more",
    "accuracy_pct": "give the accuracy in percent, above 0 and at most 100 (e.g. 95)",
    "deployment": "choose edge, cloud or on-prem",
    "continual": "choose none, sequential or critical",
    "model": "use a catalog model id (see `ftadvisor models`), a config.json path or a model folder",
    "examples": "give the number of training examples per task, 1 or more",
    "tokens_per_example": f"give the typical tokens per example, {MIN_TOKENS_PER_EXAMPLE} to {MAX_TOKENS_PER_EXAMPLE:,}",
    "complexity": "choose simple, summarization, reasoning or coding",
    "domain": "choose close or different",
    "epochs": "give the number of passes over the data, above 0 and at most 1000",
    "rent_in_cloud": "give true or false",
    "rapid_updates": "give true or false",
}


def _describe(err: dict) -> tuple[str, str]:
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else ""
    msg = err.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if not field and ":" in msg:  # model-level checks prefix their message with the field
        field = msg.split(":", 1)[0]
        msg = msg.split(":", 1)[1].strip()
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err.get("type") == "missing" else f" (got {got!r})"
    if err.get("type") == "extra_forbidden":
        return field, f"{field}: unknown question; known: {', '.join(Answers.model_fields)}"
    fix = FIXES.get(field)
    return field, f"{field}: {msg}{shown}" + (f"; {fix}" if fix else "")


def catalog_problems(gpu: Any, model: Any, rent_in_cloud: bool = False) -> list[tuple[str, str]]:
    """Unknown GPU or model, as (field, message) pairs, with the estimator's close matches."""
    from estimator import catalog
    from estimator.errors import EstimatorError

    problems = []
    if not rent_in_cloud and isinstance(gpu, str) and gpu:
        try:
            catalog.get_gpu(gpu)
        except EstimatorError as exc:
            problems.append(("gpu", f"gpu: {exc}"))
    if isinstance(model, str) and model:
        try:
            catalog.resolve_model(model)
        except EstimatorError as exc:
            problems.append(("model", f"model: {exc}"))
    return problems


def parse_answers(data: dict[str, Any] | Answers, check_catalog: bool = True) -> Answers:
    """Validate a dict of answers (form, JSON file or CLI flags); raise one AdvisorError listing every problem."""
    if isinstance(data, Answers):
        answers, lines, bad = data, [], set()
        data = answers.model_dump()
    else:
        try:
            answers, lines, bad = Answers.model_validate(data), [], set()
        except ValidationError as exc:
            described = [_describe(e) for e in exc.errors()]
            answers, lines, bad = None, [msg for _, msg in described], {f for f, _ in described}
    if check_catalog:
        defaults = Answers.model_construct()
        gpu = data.get("gpu", defaults.gpu) if "gpu" not in bad else None
        model = data.get("model", defaults.model) if "model" not in bad else None
        lines += [msg for _, msg in catalog_problems(gpu, model, bool(data.get("rent_in_cloud", False)))]
    if lines:
        first_field = lines[0].split(":", 1)[0]
        raise AdvisorError("invalid answers\n" + "\n".join(lines), field=first_field)
    return answers
