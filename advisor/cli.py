"""`ftadvisor advise`: answers (file and/or flags) -> recommendation, as text or JSON.

Exit status: 0 a recommendation; 1 nothing fits (the closest option and what it needs are printed);
2 bad answers (raised as AdvisorError and printed by ftadvisor.cli).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from advisor.answers import Answers
from advisor.errors import AdvisorError

GIB = 2**30

# flag -> Answers field
_FLAGS = {
    "budget": "budget_usd",
    "gpu": "gpu",
    "num_gpus": "num_gpus",
    "tasks": "num_tasks",
    "accuracy": "accuracy_pct",
    "deployment": "deployment",
    "continual": "continual",
    "model": "model",
    "examples": "examples",
    "tokens_per_example": "tokens_per_example",
    "complexity": "complexity",
    "domain": "domain",
    "epochs": "epochs",
}


def register(subparsers) -> None:
    """Add `advise` to the `ftadvisor` parser."""
    f = Answers.model_fields
    p = subparsers.add_parser(
        "advise",
        help="recommend full fine-tuning, LoRA or QLoRA for your situation (checked against the estimator)",
        description="Answer the seed's questions; get a method, its settings and the estimate that backs it. "
                    "Flags override the answers file.",
    )
    p.add_argument("--answers", metavar="FILE.json", help="answers as a JSON object (fields of the questionnaire)")
    p.add_argument("--budget", type=float, metavar="USD", help=f.get("budget_usd").description)
    p.add_argument("--gpu", metavar="ID", help=f.get("gpu").description)
    p.add_argument("--num-gpus", type=int, metavar="N", help=f.get("num_gpus").description)
    p.add_argument("--rent", action="store_true", default=None, help=f.get("rent_in_cloud").description)
    p.add_argument("--tasks", type=int, metavar="N", help=f.get("num_tasks").description)
    p.add_argument("--accuracy", type=float, metavar="PCT", help=f.get("accuracy_pct").description)
    p.add_argument("--deployment", choices=["edge", "cloud", "on-prem"], help=f.get("deployment").description)
    p.add_argument("--rapid-updates", action="store_true", default=None, help=f.get("rapid_updates").description)
    p.add_argument("--continual", choices=["none", "sequential", "critical"], help=f.get("continual").description)
    p.add_argument("--model", metavar="ID|PATH", help=f.get("model").description)
    p.add_argument("--examples", type=int, metavar="N", help=f.get("examples").description)
    p.add_argument("--tokens-per-example", type=int, metavar="T", help=f.get("tokens_per_example").description)
    p.add_argument("--complexity", choices=["simple", "summarization", "reasoning", "coding"],
                   help=f.get("complexity").description)
    p.add_argument("--domain", choices=["close", "different"], help=f.get("domain").description)
    p.add_argument("--epochs", type=float, metavar="E", help=f.get("epochs").description)
    p.add_argument("--json", action="store_true", help="print the recommendation as JSON")
    p.set_defaults(func=advise_command)


def gather_answers(args) -> dict[str, Any]:
    """The answers file (if any) with the flags laid over it, as a plain dict (validated by the advisor)."""
    data: dict[str, Any] = {}
    if args.answers:
        path = Path(args.answers)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise AdvisorError(f"answers: cannot read {path} ({exc.strerror}); give a readable JSON file",
                               field="answers") from None
        except json.JSONDecodeError as exc:
            raise AdvisorError(f"answers: {path} is not valid JSON (line {exc.lineno}: {exc.msg}); fix the file",
                               field="answers") from None
        if not isinstance(loaded, dict):
            raise AdvisorError(f"answers: {path} must hold a JSON object of answers, not {type(loaded).__name__}",
                               field="answers")
        data.update(loaded)
    for flag, field in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            data[field] = value
    if args.rapid_updates:
        data["rapid_updates"] = True
    if args.rent:
        data["rent_in_cloud"] = True
    return data


def advise_command(args) -> int:
    from advisor.recommend import recommend
    from advisor.result import NothingFits

    data = gather_answers(args)
    try:
        rec = recommend(data)
    except NothingFits as exc:
        if args.json:
            print(json.dumps(exc.result.model_dump(mode="json"), indent=2))
        else:
            print(format_nothing_fits(exc.result))
        return 1
    if args.json:
        print(json.dumps(rec.model_dump(mode="json"), indent=2))
    else:
        print(format_recommendation(rec))
    return 0


# ------------------------------------------------------------------------------------------------ formatting
def _gib(n) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _usd(x) -> str:
    if x is None:
        return "?"
    return f"${x:.4f}" if 0 < x < 0.01 else (f"${x:,.2f}" if x < 100 else f"${x:,.0f}")


def _hours(h) -> str:
    if h is None:
        return "?"
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def format_recommendation(rec) -> str:
    """A readable explanation: the method and settings, why (step by step), figures, alternatives, warnings."""
    name = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA"}[rec.method]
    lines = [f"Recommendation: {name} of {rec.model} on {rec.num_gpus}x {rec.gpu}", ""]
    settings = []
    if rec.rank is not None:
        settings.append(f"rank r={rec.rank}, alpha={rec.alpha:g}, dropout={rec.dropout:g}, targets={rec.target_modules}"
                        + (", rsLoRA" if rec.rslora else "") + (", DoRA" if rec.dora else ""))
    if rec.quantization != "none":
        settings.append(f"base quantized to 4-bit {rec.quantization.upper()} (double quantization)")
    settings.append(f"optimizer {rec.optimizer}, learning rate {rec.learning_rate:g}, {rec.epochs:g} epochs")
    settings.append(f"micro-batch {rec.micro_batch_size} x gradient accumulation {rec.gradient_accumulation_steps}, "
                    f"sequence length {rec.seq_len}, {rec.dtype}"
                    + (", gradient checkpointing" if rec.gradient_checkpointing else "")
                    + (f", sharding {rec.sharding}" if rec.sharding not in ("none",) else ""))
    lines += ["Settings:"] + [f"  - {s}" for s in settings] + [""]

    est = rec.estimate
    mem = est.get("memory", {}) if isinstance(est.get("memory"), dict) else {}
    peak = mem.get("peak_bytes", est.get("memory.peak_bytes"))
    gpu_mem = (est.get("gpu", {}) or {}).get("memory_bytes") if isinstance(est.get("gpu"), dict) \
        else est.get("gpu.memory_bytes")
    comp = est.get("compute", {}) if isinstance(est.get("compute"), dict) else {}
    hours = comp.get("hours", est.get("compute.hours"))
    lines += ["Figures (estimator):",
              f"  - peak memory {_gib(peak)} per GPU of {_gib(gpu_mem)}",
              f"  - time {_hours(hours)} per task, cost {_usd(rec.cost_usd)} for {rec.answers.num_tasks} "
              f"task(s) (budget {_usd(rec.answers.budget_usd)})"]
    storage = rec.storage or {}
    store_bits = [f"{k.replace('_bytes', '').replace('_', ' ')} {_gib(v)}" for k, v in storage.items()
                  if k.endswith("_bytes") and isinstance(v, (int, float))]
    if store_bits:
        lines.append(f"  - storage for {rec.answers.num_tasks} task(s): " + ", ".join(store_bits))
    lines.append("")

    lines.append("Why, step by step:")
    steps = [r for r in rec.reasons if r.kind != "conflict"]  # conflicts are listed with the warnings
    for i, r in enumerate(steps, 1):
        where = f" [seed: {r.section}]" if r.section else ""
        if r.kind == "physics":
            lines.append(f"  {i:2d}. {r.question} -> {r.answer} ({r.effect}){where}")
        else:
            lines.append(f"  {i:2d}. {r.question} [{r.answer}] -> {r.effect} (rule {r.rule}){where}")
    lines.append("")
    if rec.alternatives:
        lines.append("Alternatives:")
        for alt in rec.alternatives:
            fig = f"peak {_gib(alt.peak_bytes)}, cost {_usd(alt.cost_usd)}, at {alt.knobs}"
            lines.append(f"  - {alt.method}: {fig}; {alt.why_not}")
        lines.append("")
    if rec.warnings:
        lines.append("Warnings:")
        lines += [f"  ! {w}" for w in rec.warnings]
    return "\n".join(lines).rstrip() + "\n"


def format_nothing_fits(result) -> str:
    lines = ["Nothing fits: this is not a plan.", "", result.message, "", "Tried:"]
    for cand in result.tried:
        lines.append(f"  - {cand.verdict}")
    if result.needed:
        lines += ["", "What would make it fit:"] + [f"  - {n}" for n in result.needed]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="ftadvisor")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
