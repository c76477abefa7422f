"""Datasets for a run: read and check a file before any model is loaded, then tokenize it with loss masks.

Formats (one per file, detected from the columns or given in ``DatasetSpec.format``):

- ``text``: ``{"text": ...}``; every token is trained.
- ``prompt_completion``: ``{"prompt": ..., "completion": ...}``; the text is prompt + completion + EOS, and with
  ``completion_only_loss`` only the completion (and EOS) tokens are trained (prompt labels are -100).
- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``; rendered with the tokenizer's chat
  template, and with ``completion_only_loss`` only the assistant turns are trained.

Masks are built by construction (torchtune's way): a row is cut into pieces (prompt | completion; for chat data
the template's text up to each assistant turn | that turn), each piece is tokenized on its own and the ids are
concatenated, so the trained labels are exactly the ids of the completion / assistant pieces whatever whitespace
sits at a boundary. This holds for any chat template that renders earlier turns the same way when later turns
are added (a template that does not is reported by the check, with the row). We do not use trl's
``assistant_only_loss`` because it needs ``{% generation %}`` markers that the ChatML templates of SmolLM2 and
the tiny test models lack (trl only patches a fixed list of templates).

``check_dataset`` is what the app and the worker call first: format, rows, token-length statistics and the share
truncated at ``seq_len``, rows with no trained tokens, and errors with 1-based row numbers and the column.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from runner.errors import RunnerError
from runner.spec import DatasetSpec

FORMATS = ("text", "prompt_completion", "messages")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
ROLES = ("system", "user", "assistant", "tool")
IGNORE_INDEX = -100  # label value the loss skips (torch.nn.CrossEntropyLoss default ignore_index)
#: Errors listed per file before the rest are summarised (a broken 100k-row file should not flood the app).
MAX_LISTED_ISSUES = 50


class RowIssue(BaseModel):
    row: int = Field(description="1-based row number in the file (0 = the file as a whole)")
    column: str | None = Field(None, description="column the issue is in, if any")
    message: str
    file: str | None = Field(None, description="file the row is in (train or eval file)")

    def __str__(self) -> str:
        where = f"row {self.row}" if self.row else "file"
        col = f", column {self.column!r}" if self.column else ""
        return f"{self.file + ': ' if self.file else ''}{where}{col}: {self.message}"


#: Rows of the file shown with the text that carries a loss (``DatasetReport.samples``).
SAMPLE_ROWS = 3


class TrainedSample(BaseModel):
    row: int = Field(description="1-based row number in the train file")
    trained_text: str = Field(description="the decoded tokens of the row that carry a loss (after truncation)")


class DatasetReport(BaseModel):
    format: str | None = Field(None, description="text | prompt_completion | messages (None if unknown)")
    rows: int = Field(0, description="rows in the train file")
    eval_rows: int = Field(0, description="rows in the eval file (0 when eval is held out of the train file)")
    errors: list[RowIssue] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    token_lengths: list[int] = Field(default_factory=list, description="tokens per train row, before truncation")
    seq_len: int = 0
    truncated_share: float = Field(0.0, description="share of rows longer than seq_len (0..1)")
    empty_target_rows: list[int] = Field(default_factory=list,
                                         description="1-based rows with no trained token after truncation")
    trained_tokens: int = Field(0, description="tokens with a loss, summed over train rows after truncation")
    sha256: str | None = Field(None, description="sha256 of the train file (plus eval file) bytes")
    samples: list[TrainedSample] = Field(default_factory=list,
                                         description=f"the first {SAMPLE_ROWS} train rows: what is trained")

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, Any]:
        lengths = sorted(self.token_lengths)
        stats = {}
        if lengths:
            stats = {"min": lengths[0], "median": lengths[len(lengths) // 2],
                     "p95": lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], "max": lengths[-1],
                     "mean": round(sum(lengths) / len(lengths), 1)}
        return {"format": self.format, "rows": self.rows, "eval_rows": self.eval_rows, "ok": self.ok,
                "token_length": stats, "truncated_share": round(self.truncated_share, 4),
                "empty_target_rows": len(self.empty_target_rows), "trained_tokens": self.trained_tokens,
                "errors": [str(e) for e in self.errors], "warnings": self.warnings,
                "samples": [s.model_dump() for s in self.samples]}


# ---------------------------------------------------------------------------------------------- reading files


def file_sha256(*paths: str | Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path:
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def read_rows(path: str | Path) -> tuple[list[dict], list[RowIssue]]:
    """Read a JSONL/CSV/Parquet file into row dicts; problems come back as RowIssues (1-based rows)."""
    path = Path(path).expanduser()
    name = path.name
    if not path.exists():
        return [], [RowIssue(row=0, message=f"file not found: {path}", file=name)]
    if not path.is_file():
        return [], [RowIssue(row=0, message=f"not a file: {path}", file=name)]
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        return [], [RowIssue(row=0, file=name, message=f"unsupported file type {path.suffix!r}; use .jsonl, .csv "
                                                     "or .parquet")]
    if path.stat().st_size == 0:
        return [], [RowIssue(row=0, message="file is empty", file=name)]
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}[kind]
    rows, issues = reader(path)
    for issue in issues:
        issue.file = name
    if not rows and not issues:
        issues.append(RowIssue(row=0, message="file has no rows", file=name))
    return rows, issues


def _read_jsonl(path: Path) -> tuple[list[dict], list[RowIssue]]:
    rows, issues = [], []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                issues.append(RowIssue(row=number, message=f"not UTF-8 (byte {raw[exc.start]:#04x} at position "
                                                           f"{exc.start}); re-save the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                issues.append(RowIssue(row=number, message=f"invalid JSON: {exc.msg} at column {exc.colno}"))
                continue
            if not isinstance(obj, dict):
                issues.append(RowIssue(row=number, message=f"expected a JSON object, got {type(obj).__name__}"))
                continue
            obj["_row"] = number
            rows.append(obj)
    return rows, issues


def _read_csv(path: Path) -> tuple[list[dict], list[RowIssue]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return [], [RowIssue(row=line, message=f"not UTF-8 (byte {data[exc.start]:#04x}); re-save the file as UTF-8")]
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    for number, row in enumerate(reader, start=1):  # row 1 = first data row after the header
        clean = {k: v for k, v in row.items() if k is not None}
        if "messages" in clean and isinstance(clean["messages"], str):
            try:
                clean["messages"] = json.loads(clean["messages"])
            except json.JSONDecodeError:
                pass  # reported by the row check as "messages must be a list"
        clean["_row"] = number
        rows.append(clean)
    return rows, []


def _read_parquet(path: Path) -> tuple[list[dict], list[RowIssue]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file; all mean "not readable parquet"
        return [], [RowIssue(row=0, message=f"not a readable Parquet file: {exc}")]
    rows = table.to_pylist()
    for number, row in enumerate(rows, start=1):
        row["_row"] = number
    return rows, []


# ----------------------------------------------------------------------------------------- format and rows


def detect_format(rows: list[dict]) -> str | None:
    """The format implied by the first row's columns (None when no known column set is present)."""
    if not rows:
        return None
    cols = set(rows[0])
    if "messages" in cols:
        return "messages"
    if "prompt" in cols and "completion" in cols:
        return "prompt_completion"
    if "text" in cols:
        return "text"
    return None


def _check_row(row: dict, fmt: str) -> list[RowIssue]:
    n = row.get("_row", 0)
    if fmt == "text":
        return _check_str(row, "text", n)
    if fmt == "prompt_completion":
        return _check_str(row, "prompt", n, allow_empty=True) + _check_str(row, "completion", n, allow_empty=True)
    msgs = row.get("messages")
    if "messages" not in row:
        return [RowIssue(row=n, column="messages", message="missing column")]
    if not isinstance(msgs, list) or not msgs:
        return [RowIssue(row=n, column="messages", message="must be a non-empty list of {role, content} objects")]
    issues = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            issues.append(RowIssue(row=n, column="messages", message=f"message {i + 1} needs a string 'content'"))
        elif msg.get("role") not in ROLES:
            issues.append(RowIssue(row=n, column="messages",
                                   message=f"message {i + 1} role must be one of {', '.join(ROLES)} "
                                           f"(got {msg.get('role')!r})"))
    return issues


def _check_str(row: dict, column: str, n: int, allow_empty: bool = False) -> list[RowIssue]:
    if column not in row:
        return [RowIssue(row=n, column=column, message="missing column")]
    value = row[column]
    if not isinstance(value, str):
        return [RowIssue(row=n, column=column, message=f"must be a string (got {type(value).__name__})")]
    if not allow_empty and not value.strip():
        return [RowIssue(row=n, column=column, message="is empty")]
    return []


def validate_rows(rows: list[dict], fmt: str) -> list[RowIssue]:
    issues = []
    for row in rows:
        issues.extend(_check_row(row, fmt))
    return issues


# ------------------------------------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


class TemplateError(ValueError):
    """The chat template renders a conversation's earlier turns differently once later turns are added, so the
    conversation cannot be cut into per-turn pieces (the check reports it with the row number)."""


def segments(row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """One row as consecutive text pieces ``(text, trained)``; joined they are the row's full text.

    prompt_completion: ``[(prompt, False), (completion, True)]``. messages: the chat template's text up to each
    assistant turn (its generation prompt included) untrained, each assistant turn as the template writes it
    (content and end-of-turn marker) trained. text: ``[(text, True)]``.
    """
    if fmt == "text":
        return [(row["text"], True)]
    if fmt == "prompt_completion":
        return [(row["prompt"], False), (row["completion"], True)]
    msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    full = _chat(tokenizer, msgs, add_generation_prompt=False)
    pieces, done = [], 0
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        start = len(_prefix(full, _chat(tokenizer, msgs[:i], add_generation_prompt=True), i))
        end = len(_prefix(full, _chat(tokenizer, msgs[: i + 1], add_generation_prompt=False), i + 1))
        if start < done or end < start:
            raise TemplateError(f"the chat template renders turn {i + 1} out of order")
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def _prefix(full: str, head: str, turns: int) -> str:
    if not full.startswith(head):
        raise TemplateError(f"the chat template renders the first {turns} message(s) differently once later "
                            "messages follow, so assistant turns cannot be cut out exactly")
    return head


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


#: Text put before a piece to tokenize it "mid-sequence" when the tokenizer would otherwise add a word-start
#: marker to it (SentencePiece's dummy prefix: "7" alone becomes "▁7", a space the row never had). The
#: sentinel's own ids are cut off again (torchtune's SentencePiece tokenizer does the same with "\n").
_SENTINEL = "\n"
_WORD_START = "\u2581"  # SentencePiece's word-start marker "▁"


def piece_ids(tokenizer, text: str, first: bool) -> list[int]:
    """Token ids of one piece of a row. The first piece gets the tokenizer's special tokens (BOS); later pieces
    are tokenized as text that continues a sequence (no special tokens, no added word-start prefix)."""
    if first:
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or text[:1].isspace():
        return ids
    head = tokenizer.convert_ids_to_tokens(ids[0])
    if isinstance(head, str) and head.startswith(_WORD_START):  # a prefix the text does not have
        sentinel = list(tokenizer(_SENTINEL, add_special_tokens=False)["input_ids"])
        joined = list(tokenizer(_SENTINEL + text, add_special_tokens=False)["input_ids"])
        if sentinel and joined[: len(sentinel)] == sentinel:
            return joined[len(sentinel):]
    return ids


def encode(row: dict, fmt: str, tokenizer, completion_only: bool = True) -> Encoded:
    """Token ids and labels of one row (not truncated), built piece by piece (``segments``): each piece is
    tokenized on its own and the ids are concatenated, so the labels are exactly the ids of the trained pieces
    (-100 elsewhere) whatever whitespace sits at a boundary: a prompt ending in a space and the completion
    "7" give ``... "?", " ", "7"`` with "7" trained, never a " 7" token that starts inside the prompt.

    prompt_completion and text rows end with EOS (trained: the model learns to stop). Chat rows carry the
    template's own special tokens. ``completion_only=False`` trains every token. Raises TemplateError for a
    chat template that cannot be cut into turns.
    """
    ids: list[int] = []
    labels: list[int] = []
    first = fmt != "messages"  # the chat template writes its own special tokens
    for text, trained in segments(row, fmt, tokenizer):
        part = piece_ids(tokenizer, text, first)
        first = False
        ids += part
        labels += part if (trained or not completion_only) else [IGNORE_INDEX] * len(part)
    if fmt != "messages" and tokenizer.eos_token_id is not None:  # teach the model to stop after a completion
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Encoded(ids, labels)


def trained_text(enc: Encoded, tokenizer) -> str:
    """The decoded tokens that carry a loss (special tokens kept), e.g. ``"7<|im_end|>"``."""
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


# ------------------------------------------------------------------------------------------------- check


def check_dataset(ds: DatasetSpec, tokenizer, seq_len: int) -> DatasetReport:
    """Check a dataset (and its eval file) without loading any model: format, rows, lengths, problems.

    ``tokenizer`` may be None: then no token statistics are computed. ``seq_len`` is in tokens.
    """
    report = DatasetReport(seq_len=seq_len)
    rows, issues = read_rows(ds.path)
    report.rows = len(rows)
    report.errors.extend(issues)
    fmt = ds.format if ds.format != "auto" else detect_format(rows)
    if rows and fmt is None:
        cols = ", ".join(sorted(k for k in rows[0] if k != "_row")) or "none"
        report.errors.append(RowIssue(row=rows[0]["_row"], file=Path(ds.path).name,
                                      message=f"no known columns (found: {cols}); expected 'text', 'prompt' + "
                                              "'completion', or 'messages'"))
    report.format = fmt
    eval_rows: list[dict] = []
    if ds.eval_path:
        eval_rows, eval_issues = read_rows(ds.eval_path)
        report.eval_rows = len(eval_rows)
        report.errors.extend(eval_issues)
    if fmt:
        for part, part_rows, path in (("train", rows, ds.path), ("eval", eval_rows, ds.eval_path)):
            for issue in validate_rows(part_rows, fmt):
                issue.file = Path(path).name
                report.errors.append(issue)
    if report.errors or tokenizer is None:
        _cap(report, Path(ds.path).name)
        return report
    if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
        report.errors.append(RowIssue(row=0, column="messages", message="the model's tokenizer has no chat "
                                      "template; use prompt/completion or text format, or a chat model"))
        return report
    _token_stats(report, rows, fmt, tokenizer, seq_len, ds.completion_only_loss)
    if report.errors:
        _cap(report, Path(ds.path).name)
        return report
    report.sha256 = file_sha256(ds.path, ds.eval_path)
    if not ds.eval_path and ds.eval_fraction > 0 and int(len(rows) * ds.eval_fraction) < 1:
        report.warnings.append(f"eval_fraction {ds.eval_fraction} of {len(rows)} rows holds out no row; "
                               "there will be no eval loss (raise eval_fraction or give an eval file)")
    return report


def _token_stats(report, rows, fmt, tokenizer, seq_len, completion_only) -> None:
    truncated = 0
    for row in rows:
        try:
            enc = encode(row, fmt, tokenizer, completion_only)
        except TemplateError as exc:
            report.errors.append(RowIssue(row=row["_row"], column="messages", message=f"{exc}; use a chat model "
                                          "whose template keeps earlier turns as they are, or prompt/completion"))
            continue
        report.token_lengths.append(len(enc.input_ids))
        if len(enc.input_ids) > seq_len:
            truncated += 1
        cut = Encoded(enc.input_ids[:seq_len], enc.labels[:seq_len])
        kept = cut.trained
        report.trained_tokens += kept
        if len(report.samples) < SAMPLE_ROWS:
            report.samples.append(TrainedSample(row=row["_row"], trained_text=trained_text(cut, tokenizer)))
        if kept == 0:
            report.empty_target_rows.append(row["_row"])
    report.truncated_share = truncated / len(rows) if rows else 0.0
    if truncated:
        report.warnings.append(f"{truncated} of {len(rows)} rows ({100 * report.truncated_share:.1f}%) are longer "
                               f"than seq_len {seq_len} tokens and will be truncated (longest "
                               f"{max(report.token_lengths)}); raise seq_len to keep them whole")
    empty = report.empty_target_rows
    if empty and len(empty) == len(rows):
        report.errors.append(RowIssue(row=0, message="no row has a trained token (empty completions/assistant "
                                      "turns, or all cut off by seq_len); nothing would be learned"))
    elif empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        report.warnings.append(f"{len(empty)} rows have no trained token (empty completion or cut off by seq_len "
                               f"{seq_len}) and teach nothing: rows {shown}")


def _cap(report: DatasetReport, train_file: str) -> None:
    # in file order: the train file before the eval file, whole-file problems first, then by row
    report.errors.sort(key=lambda e: (e.file not in (None, train_file), e.row))
    if len(report.errors) > MAX_LISTED_ISSUES:
        extra = len(report.errors) - MAX_LISTED_ISSUES
        report.errors = report.errors[:MAX_LISTED_ISSUES]
        report.errors.append(RowIssue(row=0, message=f"... and {extra} more problems"))


def raise_if_errors(report: DatasetReport) -> None:
    if report.errors:
        lines = "; ".join(str(e) for e in report.errors[:5])
        more = f" (+{len(report.errors) - 5} more)" if len(report.errors) > 5 else ""
        raise RunnerError(f"dataset has {len(report.errors)} problem(s): {lines}{more}", field="dataset.path",
                          kind="dataset", fix="fix the listed rows (row numbers are 1-based lines of the file)")


# ------------------------------------------------------------------------------------- training datasets


def reference_answer(row: dict, fmt: str) -> str | None:
    """The expected answer of a row for exact match: the completion, or the last assistant turn."""
    if fmt == "prompt_completion":
        return row["completion"]
    if fmt == "messages" and row["messages"] and row["messages"][-1]["role"] == "assistant":
        return row["messages"][-1]["content"]
    return None


def generation_prompt(row: dict, fmt: str, tokenizer) -> str | None:
    """The text a model continues to answer a row (prompt, or the chat up to the last assistant turn)."""
    if fmt == "prompt_completion":
        return row["prompt"]
    if fmt == "messages" and row["messages"] and row["messages"][-1]["role"] == "assistant":
        return _chat(tokenizer, row["messages"][:-1], add_generation_prompt=True)
    return None


def split_rows(ds: DatasetSpec, seed: int) -> tuple[list[dict], list[dict], str]:
    """Train and eval rows (eval file, or a seeded held-out share) and the format."""
    import random

    rows, issues = read_rows(ds.path)
    fmt = ds.format if ds.format != "auto" else detect_format(rows)
    if issues or fmt is None:
        raise RunnerError(f"dataset {ds.path} cannot be read: {issues[0] if issues else 'unknown format'}",
                          field="dataset.path", kind="dataset", fix="run the dataset check and fix the file")
    if ds.eval_path:
        eval_rows, _ = read_rows(ds.eval_path)
        return rows, eval_rows, fmt
    n_eval = int(len(rows) * ds.eval_fraction)
    if n_eval < 1:
        return rows, [], fmt
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)], fmt


def tokenize_rows(rows: list[dict], fmt: str, tokenizer, seq_len: int, completion_only: bool = True,
                  packing: bool = False):
    """A ``datasets.Dataset`` with input_ids/labels (truncated to seq_len; packed when asked).

    Rows without any trained token are dropped (they would only add a zero-loss batch entry).
    """
    from datasets import Dataset

    def _encode(batch):
        out = {"input_ids": [], "labels": []}
        for i in range(len(batch["_json"])):
            enc = encode(json.loads(batch["_json"][i]), fmt, tokenizer, completion_only)
            out["input_ids"].append(enc.input_ids[:seq_len])
            out["labels"].append(enc.labels[:seq_len])
        return out

    raw = Dataset.from_dict({"_json": [json.dumps(r) for r in rows]})
    ds = raw.map(_encode, batched=True, remove_columns=["_json"], desc="tokenize", load_from_cache_file=False)
    ds = ds.filter(lambda ex: any(x != IGNORE_INDEX for x in ex["labels"]), load_from_cache_file=False)
    ds = ds.flatten_indices()  # a filtered dataset reads rows through an index table on every batch otherwise
    if packing:
        ds = pack(ds, seq_len)
    return ds


def pack(ds, seq_len: int):
    """Greedy packing: consecutive examples share a row of up to seq_len tokens; position_ids restart per example
    so attention stays inside each example (transformers detects packed sequences from position_ids)."""
    from datasets import Dataset

    packed = {"input_ids": [], "labels": [], "position_ids": []}
    cur_ids, cur_labels, cur_pos = [], [], []
    for ids, labels in zip(ds["input_ids"], ds["labels"]):
        if cur_ids and len(cur_ids) + len(ids) > seq_len:
            packed["input_ids"].append(cur_ids)
            packed["labels"].append(cur_labels)
            packed["position_ids"].append(cur_pos)
            cur_ids, cur_labels, cur_pos = [], [], []
        cur_ids = cur_ids + ids
        cur_labels = cur_labels + [IGNORE_INDEX] + labels[1:]  # never predict across the example boundary
        cur_pos = cur_pos + list(range(len(ids)))
    if cur_ids:
        packed["input_ids"].append(cur_ids)
        packed["labels"].append(cur_labels)
        packed["position_ids"].append(cur_pos)
    return Dataset.from_dict(packed)


class Collator:
    """Pads a batch to its longest row (right padding, whatever the tokenizer's padding_side); labels padded
    with -100. Packed rows keep their restarting ``position_ids`` and get no ``attention_mask``, so transformers
    masks attention per packed example (masking_utils.find_packed_sequence_indices).

    Not transformers' collators: DataCollatorForSeq2Seq pads on the tokenizer's padding_side (left for some chat
    models, which shifts positions in training) and has no position_ids; DataCollatorWithFlattening renumbers
    positions per row, which would merge the examples of a pre-packed row. Tokens are counted by the Trainer
    (``include_num_input_tokens_seen="non_padding"``: the attention mask's sum, or ids != pad id for packed
    batches; where the pad token is EOS that leaves each packed example's EOS uncounted).
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        longest = max(len(f["input_ids"]) for f in features)
        ids, labels, mask, pos = [], [], [], []
        packed = "position_ids" in features[0]
        for f in features:
            n = len(f["input_ids"])
            pad = longest - n
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * pad)
            mask.append([1] * n + [0] * pad)
            if packed:
                pos.append(list(f["position_ids"]) + list(range(pad)))
        batch = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}
        if packed:
            batch["position_ids"] = torch.tensor(pos)  # no attention_mask: the restarts delimit examples
        else:
            batch["attention_mask"] = torch.tensor(mask)
        return batch
