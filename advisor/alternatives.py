"""The other methods beside the recommendation, each with figures of one named configuration and why it was not
chosen: its own first fitting rung of the ladder, or the recommendation's knobs where that compares fairly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from advisor.labels import gib, knobs_text, label, usd
from advisor.ladder import KNOBS, LADDER_METHODS, Context, evaluate, method_rungs, settings_dict
from advisor.result import Alternative, Candidate


def _knob_values(cand: Candidate) -> tuple:
    return tuple(cand.settings.get(k) for k in KNOBS)


@dataclass
class _Shown:
    """One alternative method: its own first fitting rung (if any), at the winner's knobs, and which is shown."""

    own: tuple[Candidate, Any] | None
    winner: tuple[Candidate, Any]
    at: Literal["own_rung", "winner_knobs"]

    @property
    def pick(self) -> tuple[Candidate, Any]:
        return self.own if self.at == "own_rung" and self.own is not None else self.winner


def alternatives(ctx: Context, method: str, wanted: str, tried: list[Candidate],
                  chosen: Candidate) -> list[Alternative]:
    """The other methods on the chosen GPUs, each at its own first fitting rung of the ladder (base ->
    checkpointing -> micro-batch 1 -> ZeRO-3), or at the recommendation's knobs when it fits no rung, or when
    its own rung would show a lighter method (QLoRA < LoRA < full) needing more memory than a heavier one."""
    from estimator.catalog import get_gpu

    gpu = get_gpu(chosen.request["gpu"])
    count = chosen.request["num_gpus"]
    here = [(gpu, count)]
    shown: dict[str, _Shown] = {}
    for m in LADDER_METHODS:
        if m == method:
            continue
        ok = first_fit = None
        for rung, _, s, _ in method_rungs(ctx, m, here, here if count > 1 else []):
            cand, est = evaluate(ctx, rung, m, s, gpu, count)
            if cand.ok:
                ok = (cand, est)
                break
            if cand.fits and cand.error is None and first_fit is None:
                first_fit = (cand, est)  # fits the memory, over the budget: kept unless a later rung is in budget
        own = ok or first_fit
        at_winner = dict(settings_dict(ctx.settings[m]), **{k: chosen.settings[k] for k in KNOBS})
        shown[m] = _Shown(own=own, winner=evaluate(ctx, "winner_knobs", m, at_winner, gpu, count),
                          at="own_rung" if own is not None else "winner_knobs")
    _keep_memory_order(method, chosen, shown)

    from estimator import storage_for_tasks

    out = []
    for m, sh in shown.items():
        cand, est = sh.pick
        storage = _storage_bytes(storage_for_tasks(est, ctx.answers.num_tasks), m) if est is not None else None
        out.append(Alternative(
            method=m, rank=cand.settings["rank"], at=sh.at, knobs=knobs_text(cand), fits=cand.fits,
            within_budget=cand.within_budget if cand.cost_usd else None, peak_bytes=cand.peak_bytes,
            gpu_memory_bytes=cand.gpu_memory_bytes, gpu=gpu.id, num_gpus=count, cost_usd=cand.cost_usd,
            hours=cand.hours, storage_bytes=storage, why_not=_why_not(ctx, m, method, wanted, chosen, sh, gpu.name),
        ))
    return out


def _keep_memory_order(method: str, chosen: Candidate, shown: dict[str, _Shown]) -> None:
    """Where a lighter method would be shown needing more memory than a heavier one at different knobs, show the
    alternatives of that pair at the recommendation's knobs instead (at equal knobs the figures are physics)."""
    for _ in LADDER_METHODS:  # each pass moves at least one alternative to the winner's knobs, or stops
        def cand_of(m: str) -> Candidate:
            return chosen if m == method else shown[m].pick[0]

        moved = False
        for i, heavy in enumerate(LADDER_METHODS):
            for light in LADDER_METHODS[i + 1:]:
                h, lt = cand_of(heavy), cand_of(light)
                if h.peak_bytes is None or lt.peak_bytes is None or lt.peak_bytes <= h.peak_bytes:
                    continue
                if _knob_values(h) == _knob_values(lt):
                    continue
                for m in (heavy, light):
                    if m != method and shown[m].at == "own_rung":
                        shown[m].at = "winner_knobs"
                        moved = True
        if not moved:
            return


def _why_not(ctx: Context, m: str, method: str, wanted: str, chosen: Candidate, sh: _Shown, gpu_name: str) -> str:
    """Why the alternative ``m`` was not recommended, opening with which configuration its figures are of."""
    cand, _ = sh.pick
    knobs = knobs_text(cand)
    # At the ladder's knobs of the recommendation (KNOBS), the regime of its own method settings (8-bit AdamW,
    # pure bf16) may still differ: then only the ladder's knobs are the recommendation's.
    if knobs == knobs_text(chosen):
        ours, sep = "the recommendation's knobs", ", "
    else:
        shared = "checkpointing, micro-batch and sharding" if chosen.request["num_gpus"] > 1 else \
            "checkpointing and micro-batch"
        ours, sep = f"the recommendation's {shared}", "; "
    if sh.at == "own_rung":
        alike = _knob_values(cand) == _knob_values(chosen)
        where = f"At its own first fitting rung ({knobs}" + (f"{sep}{ours})" if alike else ")")
    else:
        where = f"At {ours} ({knobs})"
    if cand.error:
        return f"{where}: {cand.verdict}"
    if not cand.fits or not cand.within_budget:
        why = f"{where}: rejected: {cand.verdict}"
        own = sh.own[0] if sh.own is not None else None
        if sh.at == "winner_knobs" and own is not None and own.ok:
            why += (f". At its own first fitting rung ({knobs_text(own)}) it fits ({gib(own.peak_bytes)}, "
                    f"{usd(own.cost_usd)}), but the ladder tried {label(chosen)} first")
        elif sh.at == "winner_knobs" and own is None and not cand.fits:
            why += f". It fits no rung of the ladder on {cand.request['num_gpus']}x {gpu_name}"
        return why
    if LADDER_METHODS.index(m) < LADDER_METHODS.index(wanted):
        return f"{where}: fits ({cand.verdict}), but the rules did not ask for it: {_rules_prefer(wanted, ctx)}"
    if LADDER_METHODS.index(m) > LADDER_METHODS.index(method):
        return (f"{where}: also fits ({cand.verdict}), but {method} "
                + ("is what the rules want, and it fits" if method == wanted else
                   "fits too and is higher on the ladder (fewer trade-offs in quality)"))
    return (f"{where}: fits ({cand.verdict}), but the ladder tried {label(chosen)} first "
            f"(it changes the method before it trades compute for memory)")


def _rules_prefer(wanted: str, ctx: Context) -> str:
    return {"lora": "the seed makes LoRA the default and nothing here calls for full fine-tuning",
            "qlora": "the rules picked QLoRA for this deployment/model size"}.get(wanted, "")


def _storage_bytes(storage: dict, method: str) -> int | None:
    """Disk for all tasks from the estimator's storage dict (keys differ by version: take the method's own)."""
    keys = ["full_checkpoints_bytes"] if method == "full" else ["base_plus_adapters_bytes"]
    for key in keys:
        if isinstance(storage.get(key), (int, float)):
            return int(storage[key])
    return None
