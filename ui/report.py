"""Estimate exports (CSV, Markdown) and the equivalent CLI line. Formatting only: figures come from the estimator."""

from __future__ import annotations

import csv
import io
import shlex
from typing import Any

from estimator.request import EstimateRequest
from ui.format import fmt_bytes


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}{k}."))
        return out
    return [(prefix[:-1], obj)]


def estimate_rows(est) -> list[tuple[str, Any]]:
    """The estimate's JSON (Estimate.to_json) as (dotted key, value) rows; nested or already dotted keys both work."""
    return _flatten(est.to_json())


def estimate_csv(est) -> str:
    """CSV with columns key,value (bytes stay plain integers)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["key", "value"])
    for k, v in estimate_rows(est):
        writer.writerow([k, "" if v is None else ("; ".join(map(str, v)) if isinstance(v, list) else v)])
    return buf.getvalue()


def estimate_markdown(est) -> str:
    """A Markdown report: a headline and a key/value table (bytes shown both raw and readable)."""
    lines = [f"# Estimate: {est.model.display_name}, {est.method}, {est.gpu.count} x {est.gpu.name}", "",
             f"Peak per GPU **{fmt_bytes(est.memory.peak_bytes)}** of {fmt_bytes(est.gpu.memory_bytes)} "
             f"({'fits' if est.fits else 'does not fit'}; peak during {est.memory.peak_phase}).", "",
             "| key | value |", "|---|---|"]
    for k, v in estimate_rows(est):
        if isinstance(v, list):
            continue  # the notes, listed below the table
        shown = f"{v:,} ({fmt_bytes(v)})" if k.endswith("_bytes") and isinstance(v, int) else v
        lines.append(f"| {k} | {'' if shown is None else shown} |")
    for note in getattr(est, "notes", []) or []:
        lines.append(f"\n- {note}")
    return "\n".join(lines) + "\n"


_DEFAULTS = EstimateRequest(model="x")


def estimate_cli(req: EstimateRequest) -> str:
    """The `ftadvisor estimate` command that gives the same figures (only non-default flags)."""
    args = ["ftadvisor", "estimate", "--model", req.model, "--method", req.method]
    if req.method != "full":
        args += ["--rank", str(req.rank)]
        if req.alpha is not None:
            args += ["--alpha", f"{req.alpha:g}"]
        targets = req.targets if isinstance(req.targets, str) else ",".join(req.targets)
        if targets != _DEFAULTS.targets:
            args += ["--targets", targets]
        args += ["--dora"] if req.dora else []
        args += ["--rslora"] if req.rslora else []
    pairs = [("--dtype", "dtype"), ("--optimizer", "optimizer"), ("--batch-size", "batch_size"),
             ("--seq-len", "seq_len"), ("--attention", "attention"), ("--gpu", "gpu"), ("--num-gpus", "num_gpus"),
             ("--sharding", "sharding")]
    for flag, name in pairs:
        if getattr(req, name) != getattr(_DEFAULTS, name):
            args += [flag, str(getattr(req, name))]
    args += ["--grad-checkpointing"] if req.grad_checkpointing else []
    if req.tokens is not None:
        args += ["--tokens", str(req.tokens)]
    elif req.examples is not None and req.tokens_per_example is not None:
        args += ["--examples", str(req.examples), "--tokens-per-example", str(req.tokens_per_example),
                 "--epochs", f"{req.epochs:g}"]
    if req.mfu is not None:
        args += ["--mfu", f"{req.mfu:g}"]
    if req.price is not None:
        args += ["--price", f"{req.price:g}"]
    return shlex.join(args)
