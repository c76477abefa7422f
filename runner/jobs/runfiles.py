"""The run folder's files between processes, as types: ``heartbeat.json``, ``metrics.jsonl``, ``result.json``,
``report.json``, and the ranks' ``workers/rank<N>.json``.

The worker (``runner.train.worker``, ``runner.train.recipe``, ``runner.train.callbacks``) writes them through these models; the
supervisor, the failure classifier, the job manager, the sweep, the CLI and the Runs page read them back through
the same models (and the tests' stand-in worker writes through them too), so a field is named once, here. Every
model forbids unknown keys: a writer that adds a field must add it here, and a reader never guesses.

JSON files are written atomically (temp file + rename) so a reader never sees half of one; ``metrics.jsonl`` is
appended a line at a time, and a reader skips a last line that is still being written. Only this module and pure
pydantic models are imported, so readers do not pay for torch or transformers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from runner.errors import RunnerError
from runner.tools.forgetting import ForgettingReport
from runner.tools.intruder import IntruderReport

HEARTBEAT_FILE = "heartbeat.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
REPORT_FILE = "report.json"
DATASET_CHECK_FILE = "dataset_check.json"


class RunFile(BaseModel):
    """Base of the run-folder models: unknown keys are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- heartbeat


Phase = Literal["setup", "load", "eval_before", "train", "eval_after", "save", "done"]


class Heartbeat(RunFile):
    """``heartbeat.json``, rewritten by rank 0 every few seconds (``runner.train.callbacks.Heartbeat``)."""

    pid: int = Field(description="the worker process")
    step: int = Field(description="optimizer steps done")
    max_steps: int = Field(description="optimizer steps planned (0 until known)")
    phase: Phase = "setup"
    time: float = Field(description="when it was written, Unix seconds")


class WorkerEntry(RunFile):
    """``workers/rank<RANK>.json``: a training process says it is a rank of the run
    (``runner.jobs.supervisor.register_worker``); stop-and-save signals exactly these processes."""

    pid: int = Field(description="the rank's process")
    rank: int = Field(description="its RANK (0 for a single process)")
    create_time: float = Field(description="its start time (psutil create_time), so a reused pid is not taken for it")


# ----------------------------------------------------------------------------------------------- metrics


class TrainRow(RunFile):
    """A ``metrics.jsonl`` line per logged training step (``runner.train.callbacks.MetricsCallback.on_log``)."""

    type: Literal["train"] = "train"
    step: int
    max_steps: int
    loss: float | None = None
    epoch: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = Field(None, description="tokens/s since the previous train row, all ranks")
    elapsed_s: float | None = Field(None, description="seconds since this attempt's training began")
    eta_s: float | None = Field(None, description="seconds left at this attempt's pace")
    memory_bytes: int | None = Field(None, description="CUDA allocated bytes, else the process's RSS")
    time: float | None = Field(None, description="when it was written, Unix seconds")


class EvalRow(RunFile):
    """A ``metrics.jsonl`` line per evaluation (``runner.train.callbacks.MetricsCallback.on_evaluate``)."""

    type: Literal["eval"] = "eval"
    step: int
    eval_loss: float
    max_steps: int | None = None
    epoch: float | None = None
    memory_bytes: int | None = None
    time: float | None = None


MetricsRow = Annotated[TrainRow | EvalRow, Field(discriminator="type")]
_ROW = TypeAdapter(MetricsRow)


# ----------------------------------------------------------------------------------------------- result


RunStatus = Literal["completed", "failed", "stopped", "cancelled"]


class Result(RunFile):
    """``result.json``: how the worker's attempt ended, written by rank 0 just before it exits."""

    status: RunStatus
    kind: str | None = Field(None, description="failure kind (a key of runner.exitcodes.KIND_TO_CODE: oom_step, "
                                               "dataset, ...), or stopped / cancelled; None when completed")
    reason: str = ""
    fix: str = ""
    exit_code: int | None = Field(None, description="the worker's exit status")
    time: float | None = Field(None, description="when it was written, Unix seconds")
    field: str | None = Field(None, description="the spec field a bad_spec / dataset failure is about")
    step: int | None = Field(None, description="the last optimizer step (completed and stopped runs)")


# ----------------------------------------------------------------------------------------------- report


class PeakMemory(RunFile):
    """report.json ``peak_memory``: the most memory this process held, and what kind of figure it is."""

    kind: Literal["cuda_max_allocated", "cpu_max_rss"] = Field(
        description="cuda_max_allocated: torch.cuda.max_memory_allocated() (tensors on the GPU, the allocator's "
                    "cache not included); cpu_max_rss: the process's maximum resident set size (getrusage)")
    bytes: int = Field(description="bytes, since the process started (CUDA: since the last peak reset)")


class TokenLengths(RunFile):
    """Tokens per train row before truncation."""

    min: int
    median: int
    p95: int
    max: int
    mean: float


class TrainedText(RunFile):
    """A train row as trained: the decoded tokens that carry a loss (``runner.train.data.TrainedSample``)."""

    row: int = Field(description="1-based row number in the train file")
    trained_text: str


class DatasetSummary(RunFile):
    """report.json ``dataset``: ``runner.train.data.DatasetReport.summary()`` plus the file it was read from."""

    format: str | None = None
    rows: int = 0
    eval_rows: int = 0
    ok: bool = True
    token_length: TokenLengths | None = None
    truncated_share: float = 0.0
    empty_target_rows: int = Field(0, description="rows with no trained token after truncation")
    trained_tokens: int = 0
    errors: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    samples: list[TrainedText] = Field(default_factory=list, description="the first train rows as trained")
    path: str | None = None


class Sample(RunFile):
    """A held-out prompt with its reference and what the model generated before and after training."""

    prompt: str | None = None
    reference: str | None = None
    before: str | None = None
    after: str | None = None


class Report(RunFile):
    """``report.json``: what a completed run did and measured (``runner.train.recipe.report``). Bytes are bytes,
    seconds are seconds; None where the run did not measure it."""

    model: str
    model_dir: str = Field(description="the folder the base model was loaded from")
    method: Literal["full", "lora", "qlora"]
    peft_variant: str | None = None
    rank: int | None = None
    device: str
    precision: str = Field(description="the precision the run used")
    precision_requested: str = Field(description="the spec's precision (auto may resolve to bf16/fp16/fp32)")
    dataset: DatasetSummary
    train_rows: int
    eval_rows: int
    steps: int
    max_steps: int
    epochs: float | None = None
    train_seconds: float
    train_tokens: int | None = None
    tokens_per_s: float | None = None
    first_loss: float | None = None
    final_loss: float | None = None
    eval_loss_before: float | None = None
    eval_loss_after: float | None = None
    exact_match_before: float | None = None
    exact_match_after: float | None = None
    answer_match_before: float | None = Field(None, description="share of held-out answers containing the "
                                                              "reference (runner.train.recipe.answer_contains)")
    answer_match_after: float | None = None
    exact_match_rows: int = 0
    samples: list[Sample] = Field(default_factory=list)
    trainable_params: int
    total_params: int
    adapter_bytes: int | None = Field(None, description="adapter/*.safetensors bytes (LoRA, QLoRA)")
    model_bytes: int | None = Field(None, description="model/*.safetensors bytes (full fine-tuning)")
    output: str = Field(description="the adapter/ or model/ folder")
    resumed_from: str | None = None
    peak_memory: PeakMemory | None = None
    notes: list[str] = Field(default_factory=list)
    forgetting: ForgettingReport | None = None
    intruder_dimensions: IntruderReport | None = None
    adalora_update_calls: int | None = None
    adalora_rank_pattern: dict[str, int] | None = None


# ------------------------------------------------------------------------------ the worker's own files (resume)


class Fingerprint(RunFile):
    """``fingerprint.json``: what a resumed run must share with the run that saved its checkpoints
    (``runner.train.recipe.fingerprint``; a change refuses the resume)."""

    model: str
    model_config_sha256: str
    method: Literal["full", "lora", "qlora"]
    peft_variant: str | None = None
    dataset_sha256: str
    dataset_path: str
    created: float = Field(description="Unix seconds")


class EvalSample(RunFile):
    """One held-out prompt of an evaluation: its reference, what the model generated, and whether it matched."""

    prompt: str
    reference: str
    generated: str
    match: bool


class Evaluation(RunFile):
    """``baseline.json``: the evaluation before training (``runner.train.recipe._evaluate``), kept so that a resumed
    run reports the same 'before' figures without evaluating a half-trained model."""

    eval_loss: float | None = None
    exact_match: float | None = None
    answer_match: float | None = None
    exact_match_rows: int = 0
    samples: list[EvalSample] = Field(default_factory=list)
    general_loss: float | None = Field(None, description="loss on the shipped general text (forgetting)")
    general_tokens: int | None = None


# ----------------------------------------------------------------------------------------------- read/write

_M = TypeVar("_M", bound=BaseModel)


def write_model(path: Path, obj: BaseModel) -> None:
    """Write a model as JSON atomically (temp file + rename), so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(obj.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read(path: Path, model: type[_M], newer_than: float | None = None) -> _M | None:
    path = Path(path)
    try:
        if newer_than is not None and path.stat().st_mtime < newer_than:
            return None
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise RunnerError(f"{path} does not match the run-folder contract ({model.__name__}): "
                          f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}", field=path.name, kind="error",
                          fix="the file was written by another version of the worker: rerun, or delete the file"
                          ) from exc


def read_heartbeat(run_dir: Path) -> Heartbeat | None:
    """``heartbeat.json`` of a run folder, or None before the first beat."""
    return _read(Path(run_dir) / HEARTBEAT_FILE, Heartbeat)


def read_result(run_dir: Path, newer_than: float | None = None) -> Result | None:
    """``result.json`` of a run folder, or None when missing or older than ``newer_than`` (Unix seconds)."""
    return _read(Path(run_dir) / RESULT_FILE, Result, newer_than)


def read_model(path: Path, model: type[_M]) -> _M | None:
    """A run-folder file read through its model, or None when it does not exist (RunnerError when off contract)."""
    return _read(Path(path), model)


def read_report(run_dir: Path) -> Report | None:
    """``report.json`` of a run folder, or None while the run has not written it."""
    return _read(Path(run_dir) / REPORT_FILE, Report)


def append_metrics(path: Path, row: TrainRow | EvalRow) -> None:
    """Append one row to ``metrics.jsonl`` (one line, flushed)."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(row.model_dump_json() + "\n")
        fh.flush()


def read_metrics(path: Path) -> list[TrainRow | EvalRow]:
    """The rows of a ``metrics.jsonl`` written while we read it: a line that is not (yet) whole JSON is skipped;
    a whole line that does not match the contract raises RunnerError."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue  # the worker is still writing this line
        try:
            rows.append(_ROW.validate_python(data))
        except ValidationError as exc:
            raise RunnerError(f"{path}: a row does not match the run-folder contract: {exc.errors()[0]['loc']}: "
                              f"{exc.errors()[0]['msg']}", field=Path(path).name, kind="error",
                              fix="the file was written by another version of the worker") from exc
    return rows


def train_rows(rows: list[TrainRow | EvalRow]) -> list[TrainRow]:
    """The training rows that carry a loss."""
    return [r for r in rows if isinstance(r, TrainRow) and r.loss is not None]


def eval_rows(rows: list[TrainRow | EvalRow]) -> list[EvalRow]:
    return [r for r in rows if isinstance(r, EvalRow)]
