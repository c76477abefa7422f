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


def label(method: str, s: dict[str, Any]) -> str:
    """A configuration in words: 'LoRA (r=16, checkpointing, micro-batch 4x4)'."""
    name = METHOD_NAMES[method]
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


def knobs_text(cand: Candidate) -> str:
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
