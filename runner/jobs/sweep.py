"""Rank sweep: the same LoRA spec at several ranks, run one after another, compared in a table.

This is the seed article's "Comparing LoRA ranks" experiment (Practice 3: ranks 4..64, ``lora_alpha = 2*r``,
train, evaluate) run for real. The alpha/rank ratio of the given spec is kept at every rank (the seed's
``alpha = 2*r`` is the default spec's 32/16), so the LoRA scaling is the same and only the capacity changes.
The device queue runs the launches in order; ``sweep_rows`` reads each finished run folder.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from pydantic import BaseModel, Field

from runner.errors import RunnerError
from runner.jobs.manager import JobManager
from runner.jobs.registry import RunRecord
from runner.jobs.runfiles import METRICS_FILE, eval_rows, read_metrics, read_report
from runner.spec import RunSpec

#: Same bounds as ``PeftSettings.r``.
MIN_RANK, MAX_RANK = 1, 1024


class SweepRow(BaseModel):
    """One rank of a sweep. Sizes in bytes, times in seconds; None where the run did not produce it (yet)."""

    run_id: str
    rank: int
    alpha: float
    status: str
    trainable_params: int | None = Field(None, description="from the run's report.json")
    final_eval_loss: float | None = Field(None, description="report.json eval_loss_after, else the last eval row "
                                                            "of metrics.jsonl")
    adapter_bytes: int | None = Field(None, description="bytes on disk of adapter/*.safetensors")
    train_seconds: float | None = Field(None, description="report.json train time, else the run's wall time")
    reason: str | None = None


def parse_ranks(text: str) -> list[int]:
    """``"4,8,16"`` -> [4, 8, 16]; a RunnerError naming ``--ranks`` otherwise."""
    try:
        ranks = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise RunnerError(f"--ranks: give comma-separated integers like 4,8,16 (got {text!r})",
                          field="ranks") from None
    check_ranks(ranks)
    return ranks


def check_ranks(ranks: list[int]) -> None:
    if not ranks:
        raise RunnerError("ranks: give at least one rank, e.g. 4,8,16", field="ranks")
    bad = [r for r in ranks if not MIN_RANK <= r <= MAX_RANK]
    if bad:
        raise RunnerError(f"ranks must be between {MIN_RANK} and {MAX_RANK} (got {bad[0]})", field="ranks")
    if len(set(ranks)) != len(ranks):
        raise RunnerError(f"ranks: each rank once (got {ranks})", field="ranks")


def rank_specs(spec: RunSpec, ranks: list[int]) -> list[RunSpec]:
    """One spec per rank: same everything, ``r`` changed, alpha keeping the spec's alpha/r ratio."""
    check_ranks(ranks)
    if spec.method == "full":
        raise RunnerError("method: a rank sweep compares LoRA ranks; use method lora or qlora", field="method")
    ratio = spec.peft.alpha / spec.peft.r
    base = spec.name or Path(spec.model).name
    specs = []
    for r in ranks:
        peft = spec.peft.model_copy(update={"r": r, "alpha": ratio * r})
        out = str(Path(spec.output_dir) / f"rank-{r}") if spec.output_dir else None
        specs.append(spec.model_copy(update={"peft": peft, "name": f"{base} r={r}", "output_dir": out}))
    return specs


def launch_sweep(manager: JobManager, spec: RunSpec, ranks: list[int]) -> list[RunRecord]:
    """Launch every rank now; the device queue runs them one after another, in the order given."""
    sweep_id = "sweep-" + secrets.token_hex(3)
    return [manager.launch(s, sweep_id=sweep_id) for s in rank_specs(spec, ranks)]


def adapter_weight_bytes(folder: Path) -> int | None:
    """Bytes on disk of the adapter's weights (``*.safetensors`` in ``adapter/``): the part that grows with the
    rank. The tokenizer files saved next to it are the same for every rank and are left out."""
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(p.stat().st_size for p in files) if files else None


def sweep_row(manager: JobManager, rec: RunRecord) -> SweepRow:
    """Read one run folder into a table row: the report when the run finished, else its metrics so far."""
    run_dir = rec.run_dir
    report = read_report(run_dir)
    evals = eval_rows(read_metrics(run_dir / METRICS_FILE))
    eval_loss = report.eval_loss_after if report else None  # the final evaluation
    if eval_loss is None and evals:
        eval_loss = evals[-1].eval_loss
    train_s = report.train_seconds if report else None
    if train_s is None and rec.started_at and rec.ended_at:
        train_s = (rec.ended_at - rec.started_at).total_seconds()
    return SweepRow(run_id=rec.id, rank=rec.spec.peft.r, alpha=rec.spec.peft.alpha, status=rec.status,
                    trainable_params=report.trainable_params if report else None,
                    final_eval_loss=eval_loss, adapter_bytes=adapter_weight_bytes(run_dir / "adapter"),
                    train_seconds=train_s, reason=rec.reason)


def sweep_rows(manager: JobManager, records: list[RunRecord]) -> list[SweepRow]:
    """The comparison table, one row per rank, in rank order (fresh status for each run)."""
    rows = [sweep_row(manager, manager.get(r.id)) for r in records]
    return sorted(rows, key=lambda row: row.rank)


def sweep_records(manager: JobManager, sweep_id: str) -> list[RunRecord]:
    """The runs of one sweep (by the sweep id shown by ``runs sweep``)."""
    return [r for r in manager.list() if r.sweep_id == sweep_id]
