"""The estimator against published GPU measurements: estimate / measured per row, min / median / max per kind.

Reads ``data/validation/published_gpu_memory.csv`` (other people's runs on real GPUs, each row citing its source),
estimates every row in its regime (``estimator.validation``) and prints a Markdown table: what was measured
(max_memory_allocated, max_memory_reserved or nvidia-smi), our figure of the same kind, the ratio, the band its
kind is held to (``tests/test_validation.py``), and estimated vs measured training tokens/s where the row has them.
The README's validation table is this script's output.

    .venv/bin/python benchmarks/bench_validation.py [--file CSV] [--installed-loss]

Each row's loss is traced as its own transformers computed it (``estimator.validation.loss_impl_for``: the
fms-acceleration rows ran 4.39, whose forward upcasts the logits to fp32 and whose loss copies the shifted ones);
``--installed-loss`` traces the installed transformers' loss for every row instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=None, help="validation CSV (default data/validation/...)")
    parser.add_argument("--installed-loss", action="store_true",
                        help="trace every row with the installed transformers' loss, not its own version's")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from estimator.validation import BANDS, compare_all

    out = compare_all(Path(args.file) if args.file else None, loss_by_version=not args.installed_loss)
    print("| row | kind | measured | measured GiB | ours GiB | ours / measured | band | tokens/s per GPU ours / measured |")
    print("|---|---|---|---:|---:|---:|---|---|")
    for c in out:
        lo, hi = BANDS[c.kind]
        tps = (f"{c.estimated_tokens_per_s:,.0f} / {c.measured_tokens_per_s:,.0f}"
               if c.measured_tokens_per_s else "")
        flag = "" if lo <= c.ratio <= hi else " (out of band)"
        print(f"| {c.id} | {c.kind}{' (regime differs)' if c.regime_differs else ''} | {c.measured} | "
              f"{c.measured_bytes / GIB:.2f} | {c.estimated_bytes / GIB:.2f} | {c.ratio:.3f}{flag} | "
              f"{lo:.2f}-{hi:.2f} | {tps} |")
    print()
    print("| kind | rows | ours / measured min / median / max |")
    print("|---|---:|---|")
    for kind in BANDS:
        ratios = [c.ratio for c in out if c.kind == kind]
        if ratios:
            print(f"| {kind} | {len(ratios)} | {_stats(ratios)} |")
    print(f"| all | {len(out)} | {_stats([c.ratio for c in out])} |")
    print()
    for label, kinds in (("one-GPU HF Trainer rows", ("hf_allocated",)), ("FSDP rows (2 GPUs)", ("fsdp",)),
                         ("all rows", None)):
        tps = [c.estimated_tokens_per_s / c.measured_tokens_per_s for c in out
               if c.measured_tokens_per_s and (kinds is None or c.kind in kinds)]
        print(f"tokens/s per GPU ours / measured, {label} (default MFU of the GPU catalog): {_stats(tps)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
