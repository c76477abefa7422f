"""``ftadvisor models``, ``ftadvisor gpus`` and ``ftadvisor estimate``: formatting only; the numbers come
from ``estimator.engine`` and ``estimator.catalog``."""

from __future__ import annotations

import json
import typing

GIB = 1024**3

# flag -> EstimateRequest field (for error messages that name the flag the user typed)
_FLAGS = {
    "model": "--model", "method": "--method", "rank": "--rank", "alpha": "--alpha", "targets": "--targets",
    "dora": "--dora", "rslora": "--rslora", "dtype": "--dtype", "optimizer": "--optimizer",
    "batch_size": "--batch-size", "seq_len": "--seq-len", "grad_checkpointing": "--grad-checkpointing", "grad_accum_steps": "--grad-accum",
    "attention": "--attention", "gpu": "--gpu", "num_gpus": "--num-gpus", "sharding": "--sharding",
    "examples": "--examples", "tokens_per_example": "--tokens-per-example", "epochs": "--epochs",
    "tokens": "--tokens", "mfu": "--mfu", "price": "--price", "offload": "--offload", "dropout": "--dropout",
    "master_dtype": "--master-dtype", "qlora_regime": "--qlora-regime", "eval_batch_size": "--eval-batch-size",
    "generate_batch_size": "--generate-batch-size", "max_new_tokens": "--max-new-tokens",
}


def register(subparsers) -> None:
    """Add ``models``, ``gpus`` and ``estimate`` to the ``ftadvisor`` parser."""
    p = subparsers.add_parser("models", help="list the model catalog")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_models)

    p = subparsers.add_parser("gpus", help="list the GPU catalog (memory, peak FLOP/s, price)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_gpus)

    p = subparsers.add_parser(
        "estimate", help="memory, time and cost of fine-tuning a model",
        description="Per-GPU memory of one training step (weights, gradients, optimizer, traced activations, "
                    "overhead, peak and its phase), whether it fits, and time/cost when tokens are given.")
    p.add_argument("--model", required=True, help="catalog id (ftadvisor models), config.json path or model folder")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="lora")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--targets", default="attention-qv",
                   help="preset attention-qv | attention | all-linear | all-linear+experts (also the routed "
                        "experts, LoRA with --dropout 0), or comma-separated module names")
    p.add_argument("--dora", action="store_true", help="DoRA (magnitude vector per adapted Linear)")
    p.add_argument("--rslora", action="store_true", help="rank-stabilized LoRA scaling")
    p.add_argument("--dropout", type=float, default=0.05, help="lora_dropout (default 0.05, as the runner)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16", help="compute dtype")
    p.add_argument("--master-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="full fine-tuning: fp32 master weights + autocast (default) or pure bf16/fp16 (= --dtype)")
    p.add_argument("--qlora-regime", choices=["paper", "peft-upcast"], default="paper",
                   help="QLoRA: paper = norms fp32, rest in the compute dtype (default); peft-upcast = all fp32")
    p.add_argument("--eval-batch-size", type=int, default=None, help="eval forward batch (default --batch-size)")
    p.add_argument("--generate-batch-size", type=int, default=16, help="prompts per generate() in the eval")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per eval prompt (0: none)")
    p.add_argument("--optimizer", choices=["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"],
                   default="adamw")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU (sequences)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--gpu", default="a100-80gb", help="GPU id (ftadvisor gpus)")
    p.add_argument("--num-gpus", type=int, default=1)
    p.add_argument("--sharding", choices=["none", "ddp", "zero1", "zero2", "zero3", "fsdp"], default="none")
    p.add_argument("--offload", action="store_true", help="CPU offload of optimizer states (+ params for zero3/fsdp)")
    p.add_argument("--examples", type=int, default=None, help="training examples")
    p.add_argument("--tokens-per-example", type=int, default=None, help="typical tokens per example")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--tokens", type=int, default=None, help="total training tokens (instead of examples)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation 0..1 (default per GPU)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU-hour (default from the GPU catalog)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_estimate)


# ----------------------------------------------------------------------------------------------- commands


def _models(args) -> int:
    from estimator.catalog import list_models

    models = list_models()
    if args.json:
        print(json.dumps([{"id": m.id, "display_name": m.display_name, "published_params": m.published_params,
                           "hub_id": m.hub_id, "model_type": m.model_type} for m in models], indent=2))
        return 0
    rows = [("id", "name", "parameters", "type", "hub id")]
    for m in models:
        rows.append((m.id, m.display_name, _count(m.published_params), m.model_type, m.hub_id or ""))
    print(_table(rows))
    return 0


def _gpus(args) -> int:
    from estimator.catalog import list_gpus

    gpus = list_gpus()
    if args.json:
        print(json.dumps([g.model_dump() for g in gpus], indent=2))
        return 0
    rows = [("id", "name", "memory", "bf16 TFLOP/s", "fp32 TFLOP/s", "USD/h", "MFU", "kind")]
    for g in gpus:
        rows.append((g.id, g.name, f"{g.memory_bytes / GIB:.0f} GiB",
                     f"{g.bf16_flops / 1e12:.0f}" if g.bf16_support else "-", f"{g.fp32_flops / 1e12:.1f}",
                     f"{g.price_usd_per_hour:.2f}", f"{g.default_mfu:.2f}", g.kind))
    print(_table(rows))
    return 0


def build_request(args):
    """The ``EstimateRequest`` for parsed ``estimate`` arguments; bad values raise ``EstimatorError`` naming
    the flag and the fix."""
    from pydantic import ValidationError

    from estimator.errors import EstimatorError
    from estimator.request import EstimateRequest

    targets = args.targets
    from estimator.request import TargetPreset

    presets = typing.get_args(TargetPreset)
    if targets not in presets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    data = dict(model=args.model, method=args.method, rank=args.rank, alpha=args.alpha, targets=targets,
                dora=args.dora, rslora=args.rslora, dropout=args.dropout, dtype=args.dtype,
                master_dtype=args.master_dtype, qlora_regime=args.qlora_regime,
                eval_batch_size=args.eval_batch_size, generate_batch_size=args.generate_batch_size,
                max_new_tokens=args.max_new_tokens,
                optimizer=args.optimizer, batch_size=args.batch_size, seq_len=args.seq_len,
                grad_checkpointing=args.grad_checkpointing, grad_accum_steps=args.grad_accum,
                attention=args.attention, gpu=args.gpu,
                num_gpus=args.num_gpus, sharding=args.sharding, offload=args.offload, examples=args.examples,
                tokens_per_example=args.tokens_per_example, epochs=args.epochs, tokens=args.tokens,
                mfu=args.mfu, price=args.price)
    try:
        return EstimateRequest(**data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err.get("loc") else "input"
            flag = _FLAGS.get(field, field)
            lines.append(f"{flag}: {err['msg'].lower()} (got {err.get('input')!r}); fix {flag} and retry")
        first = str(exc.errors()[0]["loc"][0]) if exc.errors() and exc.errors()[0].get("loc") else None
        raise EstimatorError("; ".join(lines), field=first) from None


def _without_bitsandbytes() -> None:
    """Keep bitsandbytes out of this process: a terminal ``estimate`` of full fine-tuning or LoRA, whose process is
    the command and exits after (``args.own_process``; never when ``main`` is called with arguments in-process).

    peft imports bitsandbytes whenever it is installed, and bitsandbytes wraps its CPU kernels in ``torch.compile``
    at import, which loads torch's inductor: about 1.2 s of CPU, a fifth of a cold estimate. Only a QLoRA trace
    uses it (peft's 4-bit LoRA layer); full and LoRA figures do not change without it (tests/test_result_cache.py
    compares them). ``sys.modules[name] = None`` is Python's documented "not importable" marker: peft's
    ``find_spec`` check then reports bitsandbytes unavailable. Nothing is changed if it is already imported.
    """
    import sys

    sys.modules.setdefault("bitsandbytes", None)


def _quiet_bitsandbytes_cpu_kernels() -> None:
    """bitsandbytes warns at import on a CPU with AVX512-BF16 that its faster CPU 4-bit kernel needs the ``kernels``
    package ("Failed to load CPU gemm_4bit_forward from kernels-community"). An estimate runs no 4-bit kernel (the
    trace's NF4 layers are stand-ins on fake tensors), so in an estimate's own process that line is noise."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _estimate(args) -> int:
    """A stored answer when the same request was estimated before (``estimator.result_cache``: no torch or
    transformers import), else the estimator's, stored for next time."""
    from estimator import result_cache

    req = build_request(args)
    key, data = result_cache.lookup(req)
    if data is None:
        if req.method != "qlora" and getattr(args, "own_process", False):
            _without_bitsandbytes()
        elif getattr(args, "own_process", False):
            _quiet_bitsandbytes_cpu_kernels()
        from estimator.engine import estimate

        data = estimate(req).to_json()
        result_cache.store(key, data)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from estimator.result import Estimate

        print(format_estimate(Estimate.model_validate(data)))
    return 0


# ---------------------------------------------------------------------------------------------- formatting


def _count(n) -> str:
    if n is None:
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GIB:,.2f} GiB"


def _table(rows) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_estimate(est) -> str:
    """The readable text report of an estimate."""
    m, mem, g, c, req = est.model, est.memory, est.gpu, est.compute, est.request
    out = [f"{m.display_name} ({m.id}) - {est.method}"
           + (f", rank {req.rank}" if est.method != "full" else "")
           + f", {req.dtype}" + (f", pure {req.master_dtype}" if req.method == "full" and req.master_dtype != "fp32"
                                 else "") + f", batch {req.batch_size} x {req.seq_len} tokens"
           + (", gradient checkpointing" if req.grad_checkpointing else "") + f", {req.attention}", ""]
    pct = 100.0 * m.trainable_params / m.total_params if m.total_params else 0.0
    out.append(_table([("parameters", "count"), ("total", f"{m.total_params:,}"),
                       ("trainable", f"{m.trainable_params:,} ({pct:.3f}%)"), ("layers", str(m.num_layers))]))
    out.append("")
    rows = [("memory per GPU", "bytes")]
    rows += [("weights", _gib(mem.weights_bytes)), ("gradients", _gib(mem.gradients_bytes)),
             ("optimizer states", _gib(mem.optimizer_bytes)),
             (f"activations ({mem.activation_source})", _gib(mem.activations_bytes)),
             ("optimizer step temporaries", _gib(mem.optimizer_temp_bytes)),
             ("overhead", _gib(mem.overhead_bytes))]
    if mem.gathered_bytes:
        rows.append(("gathered layers", _gib(mem.gathered_bytes)))
    if mem.offloaded_bytes:
        rows.append(("offloaded to CPU", _gib(mem.offloaded_bytes)))
    for phase, value in mem.phase_peaks.items():
        rows.append((f"  at {phase}", _gib(value)))
    rows.append(("allocated peak (max_memory_allocated)", _gib(mem.allocated_peak_bytes)))
    rows.append(("reserved peak (max_memory_reserved)", _gib(mem.reserved_peak_bytes)))
    rows.append(("PEAK on the card (+ CUDA context" + (", NCCL)" if mem.nccl_bytes else ")"),
                 f"{_gib(mem.peak_bytes)} at {mem.peak_phase}"))
    if mem.load_peak_bytes:
        what = "whole 4-bit model per GPU" if mem.load_reason == "unsharded" else "experts as they quantize"
        rows.append((f"LOAD peak on the card ({what})", _gib(mem.load_device_peak_bytes)))
    out.append(_table(rows))
    out.append("")
    verdict = "yes" if est.fits else ("NO (loading)" if not est.load_fits else "NO")
    usable = g.usable_bytes or g.memory_bytes
    out.append(f"fits {g.count} x {g.name} ({_gib(usable)} usable each): {verdict}, margin "
               f"{mem.margin_bytes / GIB:+,.2f} GiB after {_gib(mem.headroom_bytes)} headroom "
               f"({100.0 * mem.peak_bytes / usable:.0f}% of memory, {req.sharding})")
    ev, host = est.eval_memory, est.host_memory
    if ev is not None:
        out.append(f"eval phase: {_gib(ev.device_peak_bytes)} on the card ({ev.phase}; KV cache "
                   f"{_gib(ev.kv_cache_bytes)}): {'fits' if ev.fits else 'DOES NOT FIT'}")
    if host is not None:
        out.append(f"host RAM per process: {_gib(host.peak_bytes)} (loading {_gib(host.load_bytes)}"
                   + (f", offload {_gib(host.offload_bytes)}" if host.offload_bytes else "") + ")")
    out.append("")
    rows = [("time and cost", "")]
    rows.append(("FLOPs per token", f"{c.flops_per_token:.3e} ({c.flops_source})"))
    rows.append(("throughput", f"{c.throughput_tokens_per_s:,.0f} tokens/s at MFU {c.mfu:.2f}"))
    if c.tokens is not None:
        rows += [("tokens", f"{c.tokens:,}"), ("FLOPs", f"{c.flops:.3e}"), ("hours", f"{c.hours:,.2f}"),
                 ("GPU-hours", f"{c.gpu_hours:,.2f}"),
                 ("cost", f"${c.cost_usd:,.2f} at ${c.price_usd_per_hour:.2f}/GPU-hour")]
    out.append(_table(rows))
    out.append("")
    st = [("storage per task", ""), ("full checkpoint", _gib(est.checkpoint_bytes))]
    if est.adapter_bytes is not None:
        st.append(("adapter", f"{est.adapter_bytes / 1024**2:,.2f} MiB"))
    out.append(_table(st))
    out.append("")
    out.append("notes:")
    out += [f"  - {n}" for n in est.notes]
    return "\n".join(out)
