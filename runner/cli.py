"""``ftadvisor run`` and ``ftadvisor runs ...``: formatting only (``ftadvisor adapters ...``: runner/adapters_cli.py).

The work is done by ``runner.jobs.manager.JobManager`` (runs) and ``runner.jobs.sweep`` (rank sweeps); this module
turns flags into a RunSpec and typed results into lines.
Exit status: 0 success (a foreground run: only when training completed), 1 the run failed or was cancelled,
2 bad input (naming the field; also a spec or dataset the worker rejected), 130 interrupted with Ctrl-C (the
run is cancelled, nothing left running).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from ftcore.errors import UserError
from runner.jobs.runfiles import EvalRow, Report, TrainRow, eval_rows, read_report

#: Seconds between polls of a followed run's metrics and status.
FOLLOW_POLL_S = 0.5
#: Exit status after Ctrl-C (128 + SIGINT, the shell convention).
EXIT_INTERRUPTED = 130
#: Exit status for bad input (the dispatcher's convention), also when the worker finds it (spec, dataset).
EXIT_BAD_INPUT = 2
#: Failure kinds (result.json) that are bad input rather than a failed run.
BAD_INPUT_KINDS = frozenset({"bad_spec", "dataset"})
#: Log lines shown under a failed run.
FAILURE_LOG_LINES = 20

# -- flags -> spec ----------------------------------------------------------------------------------------
#: (flag, dest, type, spec path, help). Every spec flag defaults to None so only given flags override.
_SPEC_FLAGS = (
    ("--name", "name", str, "name", "label for the run"),
    ("--rank", "rank", int, "peft.r", "LoRA rank r"),
    ("--alpha", "alpha", float, "peft.alpha", "lora_alpha"),
    ("--dropout", "dropout", float, "peft.dropout", "lora_dropout"),
    ("--targets", "targets", str, "peft.target_modules",
     "attention-qv | attention | all-linear, or comma-separated module names"),
    ("--variant", "variant", str, "peft.variant", "lora | loraplus | adalora"),
    ("--lr", "lr", float, "learning_rate", "learning rate"),
    ("--scheduler", "scheduler", str, "lr_scheduler", "linear | cosine | constant | constant_with_warmup"),
    ("--epochs", "epochs", float, "epochs", "epochs (ignored when --max-steps is set)"),
    ("--max-steps", "max_steps", int, "max_steps", "stop after N optimizer steps"),
    ("--batch-size", "batch_size", int, "micro_batch_size", "micro-batch size per device"),
    ("--grad-accum", "grad_accum", int, "gradient_accumulation_steps", "gradient accumulation steps"),
    ("--seq-len", "seq_len", int, "seq_len", "maximum sequence length in tokens"),
    ("--precision", "precision", str, "precision", "fp32 | bf16 | fp16"),
    ("--master-dtype", "master_dtype", str, "master_dtype",
     "full fine-tuning: fp32 (master weights + autocast, default) | bf16 | fp16 (pure 16-bit, = --precision)"),
    ("--qlora-regime", "qlora_regime", str, "qlora_regime",
     "QLoRA: paper (norms fp32, rest in the compute dtype, default) | peft-upcast (all fp32)"),
    ("--optimizer", "optimizer", str, "optimizer", "adamw | adamw-8bit | paged-adamw-8bit | sgd | adafactor"),
    ("--save-steps", "save_steps", int, "save_steps", "checkpoint every N steps"),
    ("--eval-steps", "eval_steps", int, "eval_steps", "evaluate every N steps"),
    ("--seed", "seed", int, "seed", "random seed"),
    ("--device", "device", str, "device", "auto | cpu | cuda"),
    ("--output-dir", "output_dir", str, "output_dir", "run folder (default: a new folder under the runs dir)"),
    ("--format", "data_format", str, "dataset.format", "auto | text | prompt_completion | messages"),
    ("--eval-dataset", "eval_dataset", str, "dataset.eval_path", "separate eval file"),
    ("--nproc-per-node", "nproc_per_node", int, "distribution.nproc_per_node", "processes (GPUs) per node"),
    ("--nnodes", "nnodes", int, "distribution.nnodes", "number of nodes"),
    ("--node-rank", "node_rank", int, "distribution.node_rank", "this node's rank"),
    ("--master-addr", "master_addr", str, "distribution.master_addr", "rendezvous host"),
    ("--master-port", "master_port", int, "distribution.master_port", "rendezvous port"),
    ("--strategy", "strategy", str, "distribution.strategy", "ddp | fsdp | zero2 | zero3"),
    ("--launcher", "launcher", str, "distribution.launcher", "torchrun | accelerate"),
)
#: On/off flags: (flag, dest, spec path, help).
_SPEC_SWITCHES = (
    ("--dora", "dora", "peft.use_dora", "weight-decomposed LoRA (DoRA)"),
    ("--rslora", "rslora", "peft.use_rslora", "rank-stabilized LoRA scaling alpha/sqrt(r)"),
    ("--grad-checkpointing", "grad_checkpointing", "gradient_checkpointing", "recompute activations"),
    ("--packing", "packing", "dataset.packing", "pack several examples into one sequence"),
    ("--offload", "offload", "distribution.offload", "CPU offload (zero2/zero3/fsdp)"),
)


def _add_spec_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run settings (override the spec)")
    for flag, dest, kind, _, helptext in _SPEC_FLAGS:
        group.add_argument(flag, dest=dest, type=kind, default=None, help=helptext)
    for flag, dest, _, helptext in _SPEC_SWITCHES:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)


def _set(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
    data[keys[-1]] = value


def _overrides(args) -> dict:
    out: dict = {}
    for _, dest, _, path, _ in _SPEC_FLAGS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if dest == "targets" and "," in value:
            value = [v.strip() for v in value.split(",") if v.strip()]
        _set(out, path, value)
    for _, dest, path, _ in _SPEC_SWITCHES:
        value = getattr(args, dest, None)
        if value is not None:
            _set(out, path, value)
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _load_spec_file(path: str) -> dict:
    from runner.errors import RunnerError

    file = Path(path)
    if not file.is_file():
        raise RunnerError(f"spec: no such file {path!r}", field="spec",
                          fix="give the path of a spec.json (e.g. one saved in a run folder)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunnerError(f"spec: {path} is not valid JSON ({exc})", field="spec") from None
    if not isinstance(data, dict):
        raise RunnerError(f"spec: {path} must hold a JSON object", field="spec")
    return data


def spec_from_args(args):
    """The RunSpec for ``ftadvisor run``: SPEC.json, --demo or --model/--method/--dataset, plus flag overrides."""
    from runner.spec import RunSpec

    sources = [bool(args.spec), bool(args.demo), bool(args.model)]
    if sum(sources) != 1:
        raise UserError("run: give exactly one of SPEC.json, --demo, or --model with --method and --dataset",
                        field="model")
    if args.spec:
        base = _load_spec_file(args.spec)
    elif args.demo:
        from runner.train.demo import demo_spec  # shipped with the package: a failed import is a bug, not input
        base = demo_spec().model_dump(mode="json")
    else:
        if not args.dataset:
            raise UserError("dataset: --model needs --dataset FILE (JSONL, CSV or Parquet)", field="dataset")
        base = {"model": args.model, "method": args.method or "lora", "dataset": {"path": args.dataset}}
    extra = _overrides(args)
    if args.spec or args.demo:
        if args.method:
            extra["method"] = args.method
        if args.dataset:
            _set(extra, "dataset.path", args.dataset)
    return RunSpec.model_validate(_merge(base, extra))


# -- formatting -------------------------------------------------------------------------------------------
def _hms(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(float(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(row: TrainRow | EvalRow) -> str:
    """One line per logged step: step/max, loss, tokens/s, ETA (eval rows: the eval loss)."""
    if isinstance(row, EvalRow):
        return f"eval  step {row.step}: eval_loss {row.eval_loss:.4f}"
    parts = [f"step {row.step}/{row.max_steps}"]
    if row.loss is not None:
        parts.append(f"loss {row.loss:.4f}")
    if row.learning_rate is not None:
        parts.append(f"lr {row.learning_rate:.2e}")
    if row.tokens_per_s is not None:
        parts.append(f"{row.tokens_per_s:,.0f} tok/s")
    parts.append(f"ETA {_hms(row.eta_s)}")
    return "  ".join(parts)


def _report_line(rep: Report) -> str:
    """The final report in one line: steps, time, eval loss before -> after, trainable parameters, weights."""
    parts = [f"{rep.steps} steps in {_hms(rep.train_seconds)} on {rep.device} ({rep.precision})"]
    if rep.eval_loss_after is not None:
        before = f"{rep.eval_loss_before:.4f} -> " if rep.eval_loss_before is not None else ""
        parts.append(f"eval loss {before}{rep.eval_loss_after:.4f}")
    parts.append(f"{rep.trainable_params:,} trainable params")
    weights = rep.adapter_bytes if rep.adapter_bytes is not None else rep.model_bytes
    if weights is not None:
        parts.append(f"{'adapter' if rep.adapter_bytes is not None else 'model'} {weights:,} bytes")
    return "; ".join(parts)


def _when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _print_failure(manager, rec) -> None:
    print(f"run {rec.id} {rec.status}: {rec.reason or 'no reason recorded'}", file=sys.stderr)
    if rec.fix:
        print(f"fix: {rec.fix}", file=sys.stderr)
    tail = manager.log_tail(rec.id, FAILURE_LOG_LINES)
    if tail:
        print(f"--- last log lines ({rec.output_dir}/log.txt) ---\n{tail}", file=sys.stderr)


def follow(manager, run_id: str, *, out=sys.stdout, poll_s: float = FOLLOW_POLL_S):
    """Print progress lines until the run finishes; returns the final record. Ctrl-C cancels the run."""
    seen = 0
    said_queued = said_running = False
    try:
        while True:
            rec = manager.get(run_id)
            if rec.status == "queued" and not said_queued:
                ahead = sum(1 for r in manager.list() if r.status in ("queued", "running") and r.id != rec.id
                            and (r.status == "running" or (r.queued_at or r.created_at) < (rec.queued_at or
                                                                                           rec.created_at)))
                if ahead:
                    print(f"queued behind {ahead} run(s) (one training job per device at a time)", file=out,
                          flush=True)
                said_queued = True
            if rec.status == "running" and not said_running:
                print(f"running (log: {rec.output_dir}/log.txt)", file=out, flush=True)
                said_running = True
            rows = manager.metrics(run_id)
            for row in rows[seen:]:
                print(progress_line(row), file=out, flush=True)
            seen = len(rows)
            if rec.finished:
                return rec
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ninterrupted: cancelling run {run_id} ...", file=sys.stderr, flush=True)
        rec = manager.cancel(run_id)
        print(f"run {rec.id} {rec.status}; resume with: ftadvisor runs resume {rec.id}", file=sys.stderr)
        raise


def after_run_line(report: Report) -> str | None:
    """One line with a finished run's forgetting and intruder figures (report.json), e.g.
    ``general text (40 paragraphs): loss 3.237 -> 3.251 (+0.0146); intruder dimensions: 0 in 120 modules``."""
    parts = []
    f = report.forgetting
    if f and f.after is not None:
        change = f" ({f.change:+.4f})" if f.change is not None else ""
        before = f"{f.before:.4g} -> " if f.before is not None else ""
        parts.append(f"general text ({f.texts} paragraphs): loss {before}{f.after:.4g}{change}")
    i = report.intruder_dimensions
    if i:
        parts.append(f"intruder dimensions: {i.summary.total} in {i.summary.modules} modules "
                     f"(top {i.top_k}, |cos| < {i.epsilon:g})")
    return "; ".join(parts) or None


def _finish(manager, rec, args) -> int:
    if getattr(args, "json", False):
        print(json.dumps(rec.summary(), indent=2))
    if rec.status == "completed":
        if not getattr(args, "json", False):
            saved = next((rec.run_dir / d for d in ("adapter", "model") if (rec.run_dir / d).is_dir()), None)
            print(f"run {rec.id} completed" + (f"; saved {saved}" if saved else "") + f"; folder {rec.output_dir}")
            from runner.train.demo import before_after

            report = read_report(rec.run_dir)
            for line in (before_after(report), after_run_line(report)) if report else ():
                if line:
                    print(line)
        return 0
    _print_failure(manager, rec)
    return EXIT_BAD_INPUT if rec.kind in BAD_INPUT_KINDS else 1


def _follow_and_finish(manager, rec, args) -> int:
    out = sys.stderr if args.json else sys.stdout
    try:
        final = follow(manager, rec.id, out=out)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return _finish(manager, final, args)


# -- commands ---------------------------------------------------------------------------------------------
def _manager():
    from runner.jobs.manager import JobManager

    return JobManager()


def model_ready(ref: str, out=None) -> None:
    """Refuse a model that cannot be had before anything is queued or loaded (exit 2: offline and not cached,
    gated, unknown, no room; runner.models); download a hub model that is not cached here, in the foreground with
    huggingface_hub's progress bar, so a queued run starts from the local cache."""
    from runner.models import check_model_available, resolve_model

    out = out or sys.stderr
    resolved = check_model_available(ref)
    if resolved.kind == "hub" and not resolved.ready:
        print(resolved.describe(), file=out, flush=True)
        resolved = resolve_model(ref)
    if resolved.kind == "hub":
        print(f"model: {resolved.describe()}", file=out, flush=True)


#: How close (fraction) a CUDA device's total memory must be to a catalog card's nvidia-smi total to be that card.
DEVICE_MATCH_TOLERANCE = 0.03


def _cuda_device() -> tuple[str, int] | None:
    """(name, total bytes) of CUDA device 0, or None without one. A machine without NVIDIA's driver (no
    /dev/nvidiactl, no nvidia-smi) answers None without importing torch: the run command's start stays as fast."""
    import shutil

    if not Path("/dev/nvidiactl").exists() and shutil.which("nvidia-smi") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def _model_words(name: str) -> set[str]:
    """The words of a GPU name that say which chip it is (``A100``, ``H200``, ``4090``, ``L40S``), not its size or
    form factor (``80GB``, ``SXM4``, ``HBM3``, ``PCIe``)."""
    words = name.upper().replace("-", " ").split()
    return {w for w in words if any(c.isdigit() for c in w) and not w.endswith("GB")
            and not w.startswith(("SXM", "HBM", "PCIE"))}


def _catalog_card(name: str, total: int):
    """The catalog GPU this device is: its nvidia-smi total within DEVICE_MATCH_TOLERANCE of the device's total
    memory and its chip (``_model_words``) in the device's name; None unless exactly one card matches."""
    from estimator.catalog import list_gpus

    chip = _model_words(name)
    near = [g for g in list_gpus() if abs(g.usable_bytes - total) <= DEVICE_MATCH_TOLERANCE * total]
    named = [g for g in near if chip & _model_words(g.name)]
    return named[0] if len(named) == 1 else None


def _fit_check(spec, args, out) -> None:
    """Before anything is queued: the estimate of ``spec`` on the card it will run on (``--gpu``, else the CUDA
    device here when it is a catalog card). Refuses (exit 2) what the estimate says does not fit, unless
    ``--no-fit-check``; prints the peak and margin otherwise. A CPU machine without ``--gpu``: nothing to check."""
    from estimator import estimate
    from estimator.errors import EstimatorError
    from runner.errors import RunnerError
    from runner.estimate_request import estimate_request

    if args.no_fit_check:
        return
    gpu = args.gpu
    if gpu is None:
        device = _cuda_device()
        if device is None:  # a CPU run: no card to size it for
            return
        card = _catalog_card(*device)
        if card is None:
            print(f"fit check: skipped ({device[0]} is not a catalog card; --gpu ID checks against one)", file=out,
                  flush=True)
            return
        gpu = card.id
    try:
        est = estimate(estimate_request(spec, gpu=gpu))
    except EstimatorError as exc:
        if exc.field == "gpu":  # an unknown --gpu: its message names the known ones
            raise
        print(f"fit check: skipped (the estimator cannot size this run: {exc})", file=out, flush=True)
        return
    mem = est.memory
    line = (f"{_bytes(mem.peak_bytes)} on the card at the peak ({mem.peak_phase}; "
            f"{_bytes(mem.allocated_peak_bytes)} allocated) per GPU on {est.gpu.count} x {est.gpu.name}, "
            f"which has {_bytes(mem.usable_bytes)}")
    if not est.fits:
        why = ("" if mem.margin_bytes < 0 else "but loading does not" if not est.load_fits
               else "but evaluation does not" if not est.eval_fits else "")  # the step itself fits
        raise RunnerError(f"run: the estimate says it does not fit: {line}" + (f" ({why})" if why else ""),
                          field="gpu", kind="bad_spec",
                          fix="lower --batch-size or --seq-len, turn on --grad-checkpointing, use --method "
                              "qlora, or add GPUs with --strategy fsdp; --no-fit-check launches it anyway")
    print(f"fit check: fits: {line}, margin {_bytes(mem.margin_bytes)}", file=out, flush=True)


def cmd_run(args) -> int:
    spec = spec_from_args(args)
    out = sys.stderr if args.json else sys.stdout
    model_ready(spec.model, out)
    _fit_check(spec, args, out)
    manager = _manager()
    rec = manager.launch(spec)
    if args.detach:
        if args.json:
            print(json.dumps(rec.summary(), indent=2))
        else:
            print(f"run {rec.id} {rec.status} in {rec.output_dir}\nfollow: ftadvisor runs logs {rec.id}")
        return 0
    print(f"run {rec.id} {rec.status} in {rec.output_dir}", file=sys.stderr if args.json else sys.stdout)
    return _follow_and_finish(manager, rec, args)


def _json_wanted(args) -> bool:
    return bool(getattr(args, "json", False) or getattr(args, "json_top", False))


def cmd_runs_list(args) -> int:
    records = _manager().list()
    if _json_wanted(args):
        print(json.dumps([r.summary() for r in records], indent=2))
        return 0
    if not records:
        print("no runs yet: start one with `ftadvisor run --demo`")
        return 0
    header = f"{'ID':<21} {'STATUS':<10} {'METHOD':<6} {'STEP':>11}  {'CREATED (UTC)':<19}  MODEL / REASON"
    print(header)
    for r in records:
        step = f"{r.step}/{r.max_steps}" if r.step is not None else "-"
        tail = Path(r.model or "").name or "-"
        if r.reason and r.status not in ("completed", "running", "queued"):
            tail += f"  ({r.reason})"
        print(f"{r.id:<21} {r.status:<10} {r.method or '-':<6} {step:>11}  {_when(r.created_at):<19}  {tail}")
    return 0


def cmd_runs_show(args) -> int:
    manager = _manager()
    rec = manager.get(args.id)
    rows = manager.metrics(rec.id)
    train = [r for r in rows if isinstance(r, TrainRow)]
    evals = eval_rows(rows)
    report = read_report(rec.run_dir)
    if _json_wanted(args):
        data = rec.summary()
        data["spec"] = rec.spec.model_dump(mode="json")
        data["last_metrics"] = [r.model_dump(mode="json") for r in train[-1:]] or None
        data["last_eval"] = evals[-1].model_dump(mode="json") if evals else None
        data["report"] = report.model_dump(mode="json") if report else None
        print(json.dumps(data, indent=2))
        return 0
    fields = [("id", rec.id), ("name", rec.name), ("status", rec.status), ("method", rec.method),
              ("model", rec.model), ("dataset", rec.spec.dataset.path), ("folder", rec.output_dir),
              ("created", _when(rec.created_at)), ("started", _when(rec.started_at)), ("ended", _when(rec.ended_at)),
              ("attempts", rec.attempts), ("exit code", rec.exit_code), ("reason", rec.reason), ("fix", rec.fix)]
    for key, value in fields:
        if value not in (None, ""):
            print(f"{key + ':':<10} {value}")
    if train:
        print(f"{'last:':<10} {progress_line(train[-1])}")
    if evals:
        print(f"{'eval:':<10} {progress_line(evals[-1])}")
    if report:
        print(f"{'report:':<10} {_report_line(report)}")
    if rec.status == "failed":
        tail = manager.log_tail(rec.id, FAILURE_LOG_LINES)
        print(f"--- last log lines ---\n{tail}")
    return 0


def cmd_runs_logs(args) -> int:
    manager = _manager()
    rec = manager.get(args.id)
    print(manager.log_tail(rec.id, args.lines))
    if not args.follow:
        return 0
    log = rec.run_dir / "log.txt"
    pos = log.stat().st_size if log.exists() else 0
    try:
        while True:
            if log.exists() and log.stat().st_size > pos:
                with open(log, "rb") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                pos += len(chunk)
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
            if manager.get(rec.id).finished:
                return 0
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return 0  # following the log never stops the run


def _print_record(rec, args, verb: str) -> None:
    if _json_wanted(args):
        print(json.dumps(rec.summary(), indent=2))
    else:
        print(f"run {rec.id} {verb}: {rec.status}" + (f" ({rec.reason})" if rec.reason else ""))


def cmd_runs_cancel(args) -> int:
    _print_record(_manager().cancel(args.id), args, "cancel")
    return 0


def cmd_runs_stop(args) -> int:
    manager = _manager()
    rec = manager.stop_and_save(args.id)
    if args.wait:
        rec = manager.wait(rec.id)
    _print_record(rec, args, "stop and save requested" if not rec.finished else "stop")
    return 0


def cmd_runs_resume(args) -> int:
    manager = _manager()
    rec = manager.resume(args.id)
    if args.detach:
        _print_record(rec, args, "resumed")
        return 0
    return _follow_and_finish(manager, rec, args)


def format_sweep_table(rows) -> str:
    """The rank-comparison table (text)."""
    header = (f"{'rank':>5} {'alpha':>7} {'trainable params':>17} {'final eval loss':>16} {'adapter size':>13} "
              f"{'train time':>11}  status")
    lines = [header]
    for row in rows:
        params = f"{row.trainable_params:,}" if row.trainable_params is not None else "-"
        loss = f"{row.final_eval_loss:.4f}" if row.final_eval_loss is not None else "-"
        size = _bytes(row.adapter_bytes)
        took = f"{row.train_seconds:.1f} s" if row.train_seconds is not None else "-"
        status = row.status + (f" ({row.reason})" if row.status not in ("completed", "queued", "running")
                               and row.reason else "")
        lines.append(f"{row.rank:>5} {row.alpha:>7g} {params:>17} {loss:>16} {size:>13} {took:>11}  {status}")
    return "\n".join(lines)


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def cmd_runs_sweep(args) -> int:
    from runner.spec import RunSpec
    from runner.jobs.sweep import launch_sweep, parse_ranks, sweep_records, sweep_rows

    manager = _manager()
    if args.id:
        records = sweep_records(manager, args.id)
        if not records:
            raise UserError(f"sweep: no sweep {args.id!r}; see `ftadvisor runs list --json` (sweep_id)",
                            field="sweep")
    else:
        if not args.spec:
            raise UserError("sweep: give SPEC.json and --ranks 4,8,16 (or --id SWEEP_ID)", field="spec")
        if not args.ranks:
            raise UserError("ranks: give --ranks, e.g. --ranks 4,8,16", field="ranks")
        spec = RunSpec.model_validate(_merge(_load_spec_file(args.spec), _overrides(args)))
        model_ready(spec.model, sys.stderr if _json_wanted(args) else sys.stdout)
        records = launch_sweep(manager, spec, parse_ranks(args.ranks))
        info = sys.stderr if _json_wanted(args) else sys.stdout
        print(f"sweep {records[0].sweep_id}: {len(records)} runs queued "
              f"({', '.join(r.id for r in records)})", file=info, flush=True)
        if not args.detach:
            try:
                for rec in records:
                    done = manager.wait(rec.id)
                    print(f"rank {done.spec.peft.r}: {done.status}", file=info, flush=True)
            except KeyboardInterrupt:
                for rec in records:
                    manager.cancel(rec.id)
                print("interrupted: the sweep's runs were cancelled", file=sys.stderr)
                return EXIT_INTERRUPTED
    rows = sweep_rows(manager, records)
    if _json_wanted(args):
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
    else:
        print(format_sweep_table(rows))
    return 0 if args.detach or all(r.status == "completed" for r in rows) else 1


# -- parser -----------------------------------------------------------------------------------------------
def json_command(sub, name, func, help_text):
    """A sub-command with the shared ``--json`` flag that dispatches to ``func``."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=func)
    return p


def register(subparsers) -> None:
    """Add ``run`` and ``runs`` to the ``ftadvisor`` parser (``adapters``: runner/adapters_cli.py)."""
    run = subparsers.add_parser(
        "run", help="launch a training run (foreground with progress, or --detach)",
        description="Launch a full, LoRA or QLoRA run from a spec file, the offline demo, or flags. "
                    "Exit 0 only when training completed.")
    run.add_argument("spec", nargs="?", help="spec.json (a RunSpec)")
    run.add_argument("--demo", action="store_true", help="the offline demo: SmolLM2-135M on the shipped dataset")
    run.add_argument("--model", help="catalog id, hub id (local hub cache first, else downloaded when online) or "
                                     "model folder")
    run.add_argument("--method", choices=("full", "lora", "qlora"), help="fine-tuning method")
    run.add_argument("--dataset", help="training data: JSONL, CSV or Parquet")
    _add_spec_flags(run)
    run.add_argument("--gpu", help="catalog GPU the run is sized for: refuse before launching when the estimate "
                                   "does not fit (default: the CUDA device here, when it is a catalog card)")
    run.add_argument("--no-fit-check", action="store_true", help="launch even when the estimate does not fit")
    run.add_argument("--detach", action="store_true", help="return at once; the run goes on in the background")
    run.add_argument("--json", action="store_true", help="print the run object as JSON")
    run.set_defaults(func=cmd_run)

    runs = subparsers.add_parser("runs", help="list, inspect, cancel, stop, resume runs; rank sweeps")
    runs.add_argument("--json", dest="json_top", action="store_true", help="JSON output")
    runs.set_defaults(func=cmd_runs_list)
    sub = runs.add_subparsers(dest="action", metavar="ACTION")

    def action(name, func, help_text, with_id=True):
        p = json_command(sub, name, func, help_text)
        if with_id:
            p.add_argument("id", help="run id (an unambiguous prefix is enough)")
        return p

    action("list", cmd_runs_list, "all runs, oldest first", with_id=False)
    action("show", cmd_runs_show, "one run: status, progress, reason and fix")
    logs = action("logs", cmd_runs_logs, "the last lines of a run's log")
    logs.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    action("cancel", cmd_runs_cancel, "stop a run and all its processes")
    stop = action("stop", cmd_runs_stop, "save a checkpoint, then stop (resume later)")
    stop.add_argument("--wait", action="store_true", help="wait until it has stopped")
    resume = action("resume", cmd_runs_resume, "continue a failed, stopped or cancelled run from its checkpoint")
    resume.add_argument("--detach", action="store_true", help="return at once")
    sweep = action("sweep", cmd_runs_sweep, "the same spec at several LoRA ranks, compared in a table",
                   with_id=False)
    sweep.add_argument("spec", nargs="?", help="spec.json")
    sweep.add_argument("--ranks", help="comma-separated ranks, e.g. 4,8,16")
    sweep.add_argument("--id", help="show the table of an earlier sweep (its sweep id)")
    sweep.add_argument("--detach", action="store_true", help="queue the runs and return")
    _add_spec_flags(sweep)
