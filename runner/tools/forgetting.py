"""Forgetting, measured: a model's loss on a small general held-out text set, before and after a run.

The text ships in ``data/general_eval/general_text.jsonl`` (40 short general-knowledge paragraphs written for this
project, CC0; see the README there). The loss is the mean next-token cross-entropy over every text token (nats per
token), the texts tokenized as plain text with the tokenizer's usual special tokens, no chat template. A rise after
training means the model has become a worse model of ordinary text: catastrophic forgetting, which the seed
article names as the risk of full fine-tuning and Shuttleworth et al. 2024 (arXiv:2410.21228) measure as
pre-training loss. An untrained adapter (B = 0) changes nothing, so its change is exactly zero.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from ftcore.paths import data_path

#: The shipped text set, relative to the data folder (``data_path``).
GENERAL_TEXT = ("general_eval", "general_text.jsonl")
#: Longest text kept, tokens (the shipped paragraphs are 25-40 tokens; this only bounds a user's own file).
FORGETTING_MAX_TOKENS_PER_TEXT = 128
#: Texts per forward pass.
FORGETTING_BATCH = 16


class ForgettingReport(BaseModel):
    """What ``report.json["forgetting"]`` holds (losses in nats per token)."""

    before: float | None = Field(description="loss on the general text before training")
    after: float | None = Field(description="loss on the general text after training")
    change: float | None = Field(description="after - before (positive: the model got worse at general text)")
    tokens: int = Field(0, description="tokens scored")
    texts: int = Field(0, description="paragraphs scored")
    dataset: str = Field("data/" + "/".join(GENERAL_TEXT), description="the text set")


def load_texts(path: str | Path | None = None) -> list[str]:
    """The paragraphs of a JSONL file with one ``{"text": ...}`` per line (default: the shipped set)."""
    path = data_path(*GENERAL_TEXT) if path is None else path
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def general_loss(model, tokenizer, texts: list[str] | None = None,
                 max_tokens: int = FORGETTING_MAX_TOKENS_PER_TEXT) -> tuple[float, int]:
    """(mean next-token loss over all text tokens, tokens scored) of ``model`` on ``texts`` (default: the shipped
    set). Runs under ``torch.no_grad`` in eval mode; the model's training mode is restored afterwards."""
    import torch

    texts = load_texts() if texts is None else texts
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "right"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    try:
        for i in range(0, len(texts), FORGETTING_BATCH):
            batch = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"]
                     for t in texts[i: i + FORGETTING_BATCH]]
            width = max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
            # token t is predicted from the tokens before it: logits[:, :-1] against ids[:, 1:], padding excluded
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return (total / count if count else float("nan")), count


def forgetting_report(before: float | None, after: float | None, tokens: int = 0,
                      texts: int | None = None) -> ForgettingReport:
    change = after - before if before is not None and after is not None else None
    return ForgettingReport(before=before, after=after, change=change, tokens=tokens,
                            texts=len(load_texts()) if texts is None else texts)
