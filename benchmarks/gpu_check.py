"""GPU check: measured peak memory of the runner's regimes vs the estimator's prediction.

Cases (``CASES``): full fine-tuning with fp32 master weights and in pure bf16, LoRA, QLoRA in the paper's regime
and with peft's fp32 upcast, and on an MoE (Mixtral's shape) LoRA, QLoRA (whose load, each layer's fused experts
built in 16-bit and quantized as they load, is also measured alone: ``measure_load``) and LoRA on the routed
experts too (``all-linear+experts``). Each case trains in a fresh process, so
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` start from zero and are compared with the
estimate's allocated and reserved peaks (error of each printed). The rows are stored with the GPU's name, the
library versions and the date (``--store``, default ``data/validation/gpu_check/<date>-<gpu>.json``).

Run on a machine with one CUDA GPU (no network needed):

    python benchmarks/gpu_check.py [--model llama-2-7b] [--layers 2] [--batch 4] [--seq-len 512] [--steps 3]
        [--cases full,full-bf16,lora,qlora,qlora-upcast,moe-lora,moe-qlora,moe-lora-experts] [--store PATH]

It builds a 2-layer slice of a real architecture (the catalog model's config.json with ``num_hidden_layers``
cut to ``--layers``; random weights, fixed seed; a small locally trained tokenizer, whose ids are valid in the
model's full vocabulary so the logits keep their real size), trains it a few steps with ``runner.train.recipe.run``
exactly as the worker does (bf16 autocast, the spec's micro-batch and sequence length, every sequence filled to
``--seq-len`` tokens), reads ``torch.cuda.max_memory_allocated`` and compares it with
``estimator.estimate(...)`` for the same spec. The estimator's peak includes the CUDA context and allocator
overhead, which ``max_memory_allocated`` never sees, so the error is computed on the peak without that overhead;
both are printed.

Without CUDA it prints "no CUDA device: skipped" and exits 0. ``--smoke`` runs the same pipeline on CPU with a
tiny model (plumbing check only: CPU has no allocator peak to compare).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Methods the runner implements, each with its own build path in runner/train/recipe.py.
METHODS = ("full", "lora", "qlora")
#: case -> (method, master_dtype, qlora_regime, model override or None): the regimes issue 10 asks to check.
CASES = {
    "full": ("full", "fp32", "paper", None),
    "full-bf16": ("full", "bf16", "paper", None),
    "lora": ("lora", "fp32", "paper", None),
    "qlora": ("qlora", "fp32", "paper", None),
    "qlora-upcast": ("qlora", "fp32", "peft-upcast", None),
    "moe-lora": ("lora", "fp32", "paper", "mixtral-8x7b"),
    # QLoRA on the MoE: max_memory_allocated covers the load, whose peak holds one layer's fused experts in 16-bit
    # as they are built and quantized (estimate.memory.load_peak_bytes), so the larger of the two is compared
    "moe-qlora": ("qlora", "fp32", "paper", "mixtral-8x7b"),
    # LoRA on the routed experts too (preset all-linear+experts: peft target_parameters, lora_dropout 0)
    "moe-lora-experts": ("lora", "fp32", "paper", "mixtral-8x7b"),
}
#: case -> target preset when not all-linear (with lora_dropout 0: peft's ParamWrapper has no dropout)
CASE_TARGETS = {"moe-lora-experts": "all-linear+experts"}
#: Words for the synthetic training text (any text works: each row is cut to exactly seq_len tokens).
WORDS = ("the a model data train loss rank adapter memory token review good bad great poor movie service product "
         "what is of and to in for on with user assistant system plus minus equals").split()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-2-7b", help="catalog id whose config.json is sliced")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers kept")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per method")
    parser.add_argument("--methods", default=None, help="(old name of --cases) subset of full,lora,qlora")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--store", type=Path, default=None, help="where the results are stored (default "
                        "data/validation/gpu_check/<date>-<gpu>.json; 'none' to skip)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: one case
    parser.add_argument("--gpu", default="h200-141gb", help="GPU catalog id for the estimate (memory size only "
                                                              "matters for 'fits')")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check with a tiny model")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: skipped")
        return 0
    device = "cpu" if args.smoke else "cuda"
    cases = [m.strip() for m in (args.methods or args.cases).split(",") if m.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    if args.one:
        return _child(args, device)

    work = Path(tempfile.mkdtemp(prefix="ftadvisor-gpu-check-"))
    rows = []
    for case in cases:
        out = work / f"{case}.json"
        cmd = [sys.executable, __file__, "--one", case, "--json", str(out), "--model", args.model, "--layers",
               str(args.layers), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps",
               str(args.steps), "--gpu", args.gpu] + (["--smoke"] if args.smoke else [])
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0 or not out.is_file():
            rows.append({"case": case, "error": f"exit status {done.returncode}"})
            print(f"{case}: failed (exit status {done.returncode})", flush=True)
            continue
        rows.append(json.loads(out.read_text()))
        print(format_row(rows[-1]), flush=True)
    print()
    print(format_table([r for r in rows if "error" not in r], args, device))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    if str(args.store).lower() != "none" and not args.smoke:
        path = store(rows, args)
        print(f"\nstored in {path}")
    return 0


def _child(args, device: str) -> int:
    """One case in this (fresh) process: build its model slice, train, write its row to ``args.json``."""
    method, master, regime, model = CASES[args.one]
    work = Path(tempfile.mkdtemp(prefix=f"ftadvisor-gpu-check-{args.one}-"))
    model_dir = build_slice(work / "model", model or args.model, args.layers, smoke=args.smoke)
    data = write_dataset(work / "train.jsonl", rows=max(8, args.batch * (args.steps + 1)),
                         words_per_row=args.seq_len * 2)
    row = measure(method, model_dir, data, work / "run", args, device, master_dtype=master, qlora_regime=regime,
                  targets=CASE_TARGETS.get(args.one, "all-linear"))
    row.update(case=args.one, model=model or args.model)
    args.json.write_text(json.dumps(row, indent=2) + "\n")
    return 0


def store(rows: list[dict], args) -> Path:
    """The results with the GPU, the library versions and the date, as data (``data/validation/gpu_check``)."""
    import datetime
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    today = datetime.date.today().isoformat()
    path = args.store or (Path(__file__).resolve().parents[1] / "data" / "validation" / "gpu_check"
                          / f"{today}-{gpu.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"date": today, "gpu": gpu, "cuda": torch.version.cuda, "versions": versions,
               "settings": {"model": args.model, "layers": args.layers, "batch": args.batch,
                            "seq_len": args.seq_len, "steps": args.steps}, "rows": rows}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def build_slice(folder: Path, model_id: str, layers: int, *, smoke: bool) -> Path:
    """A model folder: the catalog config cut to ``layers`` decoder layers, random weights, local tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftcore.paths import data_path
    from runner.train.tinymodel import build_tiny_model, build_tokenizer

    if smoke:
        return build_tiny_model(folder, arch="mixtral" if "mixtral" in model_id else "llama", layers=layers)
    config_path = data_path("models", model_id, "config.json")
    if not config_path.is_file():
        raise SystemExit(f"--model: no catalog config at {config_path}")
    raw = json.loads(config_path.read_text())
    raw["num_hidden_layers"] = layers
    raw.pop("quantization_config", None)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(folder)
    tokenizer = build_tokenizer()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    del model
    gc.collect()
    return folder


def write_dataset(path: Path, rows: int, words_per_row: int) -> Path:
    """Plain-text rows longer than the sequence length, so every training sequence is exactly seq_len tokens."""
    rng = random.Random(0)
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words_per_row))}) + "\n")
    return path


def make_spec(method: str, model_dir: Path, data: Path, args, device: str, master_dtype: str = "fp32",
              qlora_regime: str = "paper", targets: str = "all-linear"):
    from runner.spec import DatasetSpec, RunSpec

    return RunSpec(model=str(model_dir), method=method, dataset=DatasetSpec(path=str(data), format="text",
                                                                           eval_fraction=0.0),
                   max_steps=args.steps, save_steps=10_000, micro_batch_size=args.batch, seq_len=args.seq_len,
                   precision="bf16", master_dtype=master_dtype, qlora_regime=qlora_regime, device=device,
                   learning_rate=1e-4, logging_steps=1,
                   peft=({"target_modules": targets} | ({"dropout": 0.0} if targets != "all-linear" else {}))
                   if method != "full" else {})


def measure(method: str, model_dir: Path, data: Path, run_dir: Path, args, device: str, master_dtype: str = "fp32",
            qlora_regime: str = "paper", targets: str = "all-linear") -> dict:
    """Train ``args.steps`` steps in this process and return predicted vs measured bytes (allocated and
    reserved, each against the estimate's figure of the same kind)."""
    import torch

    from estimator import estimate
    from runner.train import recipe
    from runner.estimate_request import estimate_request

    spec = make_spec(method, model_dir, data, args, device, master_dtype, qlora_regime, targets)
    est = estimate(estimate_request(spec, gpu=args.gpu))
    # max_memory_allocated spans the whole run: the load peak counts where it is the larger (QLoRA on MoE)
    predicted_allocated = max(est.memory.allocated_peak_bytes, est.memory.load_peak_bytes)
    predicted = est.memory.peak_bytes
    overhead = est.memory.peak_bytes - est.memory.allocated_peak_bytes
    gc.collect()
    measured = reserved = None
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    load_measured = measure_load(spec, model_dir, run_dir) if device == "cuda" and est.memory.load_peak_bytes else None
    start = time.perf_counter()
    state = recipe.run(spec, run_dir)
    seconds = time.perf_counter() - start
    if device == "cuda":
        measured = torch.cuda.max_memory_allocated() - base
        reserved = torch.cuda.max_memory_reserved()
    row = {
        "method": method, "batch": args.batch, "seq_len": args.seq_len, "layers": args.layers,
        "predicted_peak_bytes": predicted, "predicted_overhead_bytes": overhead,
        "predicted_without_overhead_bytes": predicted - overhead, "peak_phase": est.memory.peak_phase,
        "activation_source": est.memory.activation_source,
        "measured_max_allocated_bytes": measured, "measured_max_reserved_bytes": reserved,
        "predicted_allocated_bytes": predicted_allocated, "predicted_load_peak_bytes": est.memory.load_peak_bytes,
        "measured_load_peak_bytes": load_measured,
        "load_error_pct": (100.0 * (est.memory.load_peak_bytes - load_measured) / load_measured)
        if load_measured else None,
        "targets": targets,
        "predicted_reserved_bytes": est.memory.reserved_peak_bytes,
        "master_dtype": master_dtype, "qlora_regime": qlora_regime,
        "error_pct": (100.0 * (predicted_allocated - measured) / measured) if measured else None,
        "reserved_error_pct": (100.0 * (est.memory.reserved_peak_bytes - reserved) / reserved) if reserved else None,
        "steps": state.trainer.state.global_step if state.trainer else None, "seconds": round(seconds, 1),
    }
    del state
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def measure_load(spec, model_dir: Path, run_dir: Path) -> int:
    """``max_memory_allocated`` of the runner's 4-bit load alone (``recipe.load_4bit``, the fused MoE experts
    quantized as they load), to compare with ``estimate.memory.load_peak_bytes``; the model is freed after."""
    import torch

    from runner.train import recipe

    r = recipe.Run(spec=spec, run_dir=run_dir)
    r.model_dir, r.tokenizer, r.precision = model_dir, recipe.load_tokenizer(model_dir), "bf16"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model, _ = recipe.load_4bit(r)
    peak = torch.cuda.max_memory_allocated() - base
    del model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return peak


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / 2**30:.3f}"


def format_row(row: dict) -> str:
    err = "n/a" if row["error_pct"] is None else f"{row['error_pct']:+.1f}%"
    rerr = "n/a" if row.get("reserved_error_pct") is None else f"{row['reserved_error_pct']:+.1f}%"
    return (f"{row.get('case', row['method'])}: allocated predicted {_gib(row['predicted_allocated_bytes'])} GiB, "
            f"measured {_gib(row['measured_max_allocated_bytes'])} GiB, error {err}; reserved predicted "
            f"{_gib(row['predicted_reserved_bytes'])} GiB, measured {_gib(row['measured_max_reserved_bytes'])} GiB, "
            f"error {rerr}; {row['steps']} steps in {row['seconds']} s"
            + (f"; load predicted {_gib(row['predicted_load_peak_bytes'])} GiB, measured "
               f"{_gib(row['measured_load_peak_bytes'])} GiB, error {row['load_error_pct']:+.1f}%"
               if row.get("load_error_pct") is not None else ""))


def format_table(rows: list[dict], args, device: str) -> str:
    model = "tiny llama (smoke test)" if args.smoke else args.model
    head = (f"{model} cut to {args.layers} layers, micro-batch {args.batch} x {args.seq_len} tokens, bf16, "
            f"device {device}")
    lines = [head, "",
             "| case | allocated predicted GiB | max allocated GiB | error % | reserved predicted GiB "
             "| max reserved GiB | error % | peak phase | activations |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "n/a" if r["error_pct"] is None else f"{r['error_pct']:+.1f}"
        rerr = "n/a" if r.get("reserved_error_pct") is None else f"{r['reserved_error_pct']:+.1f}"
        lines.append(f"| {r.get('case', r['method'])} | {_gib(r['predicted_allocated_bytes'])} | "
                     f"{_gib(r['measured_max_allocated_bytes'])} | {err} | {_gib(r['predicted_reserved_bytes'])} | "
                     f"{_gib(r['measured_max_reserved_bytes'])} | {rerr} | {r['peak_phase']} | "
                     f"{r['activation_source']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
