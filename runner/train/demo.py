"""The offline demo run (``ftadvisor run --demo``): LoRA on SmolLM2-135M-Instruct with the shipped sentiment set.

The base model answers "The sentiment of this review is negative." where the dataset wants the single word
``negative``, so exact match on the held-out file starts at 0% (measured: 0/40) and rises after a few minutes
of LoRA training on CPU. The normalized answer match (the label contained in the answer, case-insensitive) is
reported next to it, so the "before" figure measures what the base model knows, not only its answer format
(``before_after``). The data is made by ``data/datasets/make_demo_sentiment.py`` (deterministic).
"""

from __future__ import annotations

from ftcore.paths import data_path
from runner.models import DEMO_MODEL_ID
from runner.jobs.runfiles import Report
from runner.spec import DatasetSpec, PeftSettings, RunSpec

DEMO_TRAIN = data_path("datasets", "demo_sentiment.jsonl")
DEMO_EVAL = data_path("datasets", "demo_sentiment_eval.jsonl")

#: Demo settings, chosen from a real 40-step run on the 2 shared CPU cores (fp32): train loss 2.37 -> 0.01 by
#: step 10 and flat after, held-out exact match 0/40 -> 40/40, eval loss 2.31 -> 0.0007. 16 steps of batch 8
#: (128 of the 320 rows, about 55 tokens each) keep the margin; a step took about 17 s on the shared, busy
#: machine (less on an idle one). lr 1e-3 is high for LoRA but the task is tiny.
DEMO_DEFAULTS = dict(
    name="demo: SmolLM2-135M sentiment (LoRA)", model=DEMO_MODEL_ID, method="lora",
    peft=PeftSettings(r=8, alpha=16, dropout=0.0, target_modules="attention"),
    learning_rate=1e-3, lr_scheduler="linear", warmup_ratio=0.05, max_steps=16, micro_batch_size=8,
    gradient_accumulation_steps=1, seq_len=128, precision="fp32", save_steps=20, save_total_limit=2,
    logging_steps=1, seed=42, device="auto",
)


def demo_spec(**overrides) -> RunSpec:
    """The demo RunSpec; keyword overrides replace top-level fields (e.g. ``max_steps=5, output_dir=...``)."""
    fields = dict(DEMO_DEFAULTS)
    fields["dataset"] = DatasetSpec(path=str(DEMO_TRAIN), eval_path=str(DEMO_EVAL), format="messages")
    fields.update(overrides)
    return RunSpec(**fields)


def before_after(report: Report) -> str | None:
    """One line with a finished run's held-out figures before -> after training (report.json), e.g.
    ``held-out (40 rows): exact match 0% -> 100%, answer match 93% -> 100%, eval loss 2.31 -> 0.0080``.

    Exact match asks for the reference word for word; the answer match (``runner.train.recipe.answer_contains``) only
    that the answer contains it, so its "before" shows what the base model already knew in its own words.
    None when the run measured neither.
    """
    parts = []
    for label, b, a in (("exact match", report.exact_match_before, report.exact_match_after),
                        ("answer match", report.answer_match_before, report.answer_match_after)):
        if a is not None:
            parts.append(f"{label} {b:.0%} -> {a:.0%}" if b is not None else f"{label} {a:.0%}")
    b, a = report.eval_loss_before, report.eval_loss_after
    if a is not None:
        parts.append(f"eval loss {b:.3g} -> {a:.3g}" if b is not None else f"eval loss {a:.3g}")
    if not parts:
        return None
    rows = report.exact_match_rows
    return f"held-out{f' ({rows} rows)' if rows else ''}: " + ", ".join(parts)
