"""``ftadvisor data check FILE --model M [--seq-len N] [--format F] [--eval-file FILE] [--json]``.

The Launch page's dataset check from a terminal (``runner.train.data.check_dataset``, the same function the worker
runs before loading a model): format, rows, token lengths, the share truncated at ``seq_len``, rows with nothing
to learn, errors by 1-based row, and what the first rows train (``samples``: ``row`` + ``trained_text``, the
decoded tokens that carry a loss). Exit 0 when the file can be trained on, 2 when it has errors (listed with
their rows, also in ``--json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: ``--format`` choices: auto-detection from the columns, or one format forced (runner/train/data.py FORMATS).
FORMAT_CHOICES = ("auto", "text", "prompt_completion", "messages")
#: ``--seq-len`` default: RunSpec's default sequence length (runner/spec.py), so the check matches a default run.
DEFAULT_SEQ_LEN = 512


def register(subparsers) -> None:
    """Add ``data check`` to the ``ftadvisor`` parser (no heavy imports here: the parser is built for --help)."""
    data = subparsers.add_parser("data", help="check a training dataset before launching a run")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    p = sub.add_parser(
        "check", help="format, rows, token lengths, truncation and errors by row, with the model's tokenizer",
        description="Check a JSONL/CSV/Parquet dataset the way a run will read it: format, rows, token lengths "
                    "with the model's tokenizer, the share truncated at --seq-len, and errors with 1-based row "
                    "numbers. Exit 2 when the file has errors.")
    p.add_argument("file", metavar="FILE", help="training data: .jsonl, .csv or .parquet")
    p.add_argument("--model", required=True, help="catalog id, model folder, or hub id (its tokenizer is used)")
    p.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, help=f"tokens per row (default {DEFAULT_SEQ_LEN})")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help="row format (default: from the columns)")
    p.add_argument("--eval-file", help="a separate eval file, checked too")
    p.add_argument("--no-completion-only", action="store_true",
                   help="train on every token (default: only completions / assistant turns carry a loss)")
    p.add_argument("--json", action="store_true", help="the check as JSON (with samples of the trained text)")
    p.set_defaults(func=check_command)


def check_command(args) -> int:
    from pydantic import ValidationError

    from ftcore.errors import format_validation_error
    from runner.errors import RunnerError
    from runner.spec import DatasetSpec

    try:
        ds = DatasetSpec(path=str(Path(args.file).expanduser()), format=args.format,
                         eval_path=str(Path(args.eval_file).expanduser()) if args.eval_file else None,
                         completion_only_loss=not args.no_completion_only)
    except ValidationError as exc:
        raise RunnerError(f"data check: {format_validation_error(exc)}", field="dataset",
                          fix="see ftadvisor data check --help") from exc
    if args.seq_len < 1:
        raise RunnerError(f"--seq-len must be at least 1 (got {args.seq_len})", field="seq_len",
                          fix="give the run's sequence length in tokens, e.g. --seq-len 512")
    report = run_check(ds, args.model, args.seq_len)
    summary = report.summary() | {"file": ds.path, "model": args.model, "seq_len": args.seq_len}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_report(summary))
    if not report.ok:
        lines = "; ".join(summary["errors"][:10]) + (" ..." if len(summary["errors"]) > 10 else "")
        print(f"error: {Path(ds.path).name} has {len(report.errors)} problem(s): {lines}", file=sys.stderr)
        return 2
    return 0


def run_check(ds, model: str, seq_len: int):
    """``check_dataset`` with the model's tokenizer; the model reference resolves as a run's does."""
    from runner.train.data import check_dataset
    from runner.models import load_tokenizer, resolve_model_dir

    return check_dataset(ds, load_tokenizer(resolve_model_dir(model)), seq_len)


def format_report(s: dict) -> str:
    """The check as terminal lines (from ``DatasetReport.summary()`` plus file/model/seq_len)."""
    lines = [f"dataset:   {s['file']}", f"model:     {s['model']} (tokenizer)",
             f"format:    {s['format'] or 'unknown'}", f"rows:      {s['rows']}"
             + (f" (+ {s['eval_rows']} eval rows)" if s["eval_rows"] else "")]
    stats = s["token_length"]
    if stats:
        lines.append(f"tokens:    min {stats['min']}, median {stats['median']}, p95 {stats['p95']}, max {stats['max']}, "
                     f"mean {stats['mean']} per row")
        lines.append(f"truncated: {100 * s['truncated_share']:.1f}% of rows longer than seq_len {s['seq_len']}")
        lines.append(f"trained:   {s['trained_tokens']} tokens carry a loss; {s['empty_target_rows']} rows with none")
    for sample in s["samples"]:
        lines.append(f"row {sample['row']} trains: {sample['trained_text']!r}")
    lines += [f"warning:   {w}" for w in s["warnings"]]
    lines += [f"error:     {e}" for e in s["errors"]]
    lines.append("ok: ready to train" if s["ok"] else f"not ready: {len(s['errors'])} problem(s) to fix")
    return "\n".join(lines)
