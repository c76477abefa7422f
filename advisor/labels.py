"""A configuration in words: bytes as GiB, dollars, a candidate's method and knobs. Shared by the ladder's verdicts
and the explanations, so a configuration is named the same way everywhere."""

from __future__ import annotations

from typing import Any

from advisor.facts import GIB
from advisor.result import Candidate

METHOD_NAMES = {"full": "full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}
_SHARDING_LABEL = {"ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3", "fsdp": "FSDP"}


def gib(n: float | None) -> str:
    """Bytes as '12.3 GiB' ('?' when unknown)."""
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def usd(x: float | None) -> str:
    """US dollars: four decimals under a cent, cents under $100, whole dollars above ('?' when unknown)."""
    if x is None:
        return "?"
    return f"${x:.4f}" if 0 < x < 0.01 else (f"${x:,.2f}" if x < 100 else f"${x:,.0f}")


_8BIT_OPTIMIZERS = ("adamw-8bit", "paged-adamw-8bit")


def _knob_bits(method: str, s: dict[str, Any], num_gpus: int, master_dtype: str = "fp32") -> list[str]:
    """The knobs of one configuration in words, in one order: checkpointing, micro-batch x accumulation, the
    sharding (more than one GPU), then the regime the run really uses (pure bf16 / fp16: its ``master_dtype``, so
    a lean rung that fell back to fp32 master weights on a card without bf16 is not called pure; 8-bit AdamW).

    The one wording of a configuration's knobs: the ladder's verdicts (``label``), the alternatives' headers
    (``knobs_text``) and their why-not all read it, so a header never names other knobs than its figures'.
    """
    bits = ["checkpointing" if s.get("gradient_checkpointing") else "no checkpointing",
            f"micro-batch {s['micro_batch_size']}x{s['gradient_accumulation_steps']}"]
    if num_gpus > 1:
        bits.append(_SHARDING_LABEL.get(s.get("sharding"), str(s.get("sharding"))))
    if method == "full" and master_dtype != "fp32":  # the lean full rungs' regime, where it can run
        bits.append(f"pure {master_dtype}")
    if s.get("optimizer") in _8BIT_OPTIMIZERS:
        bits.append("8-bit AdamW")
    return bits


def label(cand: Candidate) -> str:
    """A candidate in words: 'QLoRA (r=16, checkpointing, micro-batch 4x4, 8-bit AdamW)'."""
    rank = [f"r={cand.settings['rank']}"] if cand.settings.get("rank") else []
    bits = rank + _knob_bits(cand.method, cand.settings, _gpus(cand), _master(cand))
    return f"{METHOD_NAMES[cand.method]} ({', '.join(bits)})"


def knobs_text(cand: Candidate) -> str:
    """The knobs of a candidate in words: 'checkpointing, micro-batch 4x4' (+ the sharding on >1 GPU, + its
    regime: pure bf16, 8-bit AdamW)."""
    return ", ".join(_knob_bits(cand.method, cand.settings, _gpus(cand), _master(cand)))


def _gpus(cand: Candidate) -> int:
    return cand.request["num_gpus"]


def _master(cand: Candidate) -> str:
    return cand.request.get("master_dtype", "fp32")
