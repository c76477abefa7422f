"""Multi-process launch: the command that starts the worker ranks and the engine config files they read.

One process: ``python -m runner.train.worker RUN_DIR``. Several: ``python -m torch.distributed.run`` (torchrun) or
``accelerate launch`` around the same worker. The engine (DDP, FSDP, DeepSpeed ZeRO-2/3) follows
``spec.distribution.strategy``; the worker merges :func:`training_args_overrides` into ``TrainingArguments``.

Files written into the run folder by :func:`write_engine_configs` (multi-process runs only):

- ``accelerate_config.yaml``: the config ``accelerate launch --config_file`` reads (always written, so the run
  can be repeated with either launcher);
- ``ds_config.json``: the DeepSpeed config (strategies zero2 / zero3);
- ``fsdp_config.json``: the ``TrainingArguments.fsdp_config`` (strategy fsdp).

Logs: the launcher's output goes to ``log.txt`` (the job manager's file); every rank keeps its own log in
``log.rank<N>.txt`` (:func:`rank_log_path`). The worker calls :func:`redirect_rank_output` first thing.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from runner.errors import RunnerError
from runner.spec import RunSpec

WORKER_MODULE = "runner.train.worker"

ACCELERATE_CONFIG = "accelerate_config.yaml"
DEEPSPEED_CONFIG = "ds_config.json"
FSDP_CONFIG = "fsdp_config.json"

#: Gradient-norm clipping written into the DeepSpeed config and passed as ``max_grad_norm`` so the two agree
#: (transformers' ``HfTrainerDeepSpeedConfig.trainer_config_process`` refuses a mismatch). 1.0 is the
#: ``TrainingArguments.max_grad_norm`` default in transformers 5.x.
GRADIENT_CLIPPING = 1.0

#: FSDP version handed to transformers/accelerate: 2 (per-parameter sharding, ``fully_shard``) is the default in
#: transformers 5.x; FSDP1 is deprecated there ("will be removed in v5.20", training_args.py).
FSDP_VERSION = 2

#: ZeRO stage per strategy name (DeepSpeed docs, "ZeRO": stage 2 shards optimizer states + gradients,
#: stage 3 also the parameters).
ZERO_STAGE = {"zero2": 2, "zero3": 3}

#: Precision name of the spec -> accelerate ``mixed_precision`` value.
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

#: Precision name of the spec -> torch dtype name (also the ``bnb_4bit_quant_storage`` string transformers accepts).
TORCH_DTYPE_NAME = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


# --------------------------------------------------------------------------------------------------- queries


def is_distributed(spec: RunSpec) -> bool:
    """True when the spec asks for more than one process in total (any node count)."""
    return spec.distribution.world_size > 1


def estimator_sharding(spec: RunSpec) -> str:
    """The estimator's sharding name (none | ddp | zero2 | zero3 | fsdp) for the launched strategy.

    One process in total is ``none`` whatever the strategy says. The whole spec -> request mapping (offload,
    GPU count and the rest) is ``runner.estimate_request.estimate_request``.
    """
    if not is_distributed(spec):
        return "none"
    return spec.distribution.strategy


def quant_storage_dtype(spec: RunSpec) -> str | None:
    """``BitsAndBytesConfig(bnb_4bit_quant_storage=...)`` for this spec, or None for bitsandbytes' default (uint8).

    FSDP and ZeRO-3 flatten and shard parameters and need every parameter of a unit in one dtype, so QLoRA's
    packed 4-bit weights must be stored in the model's dtype (transformers docs "FSDP-QLoRA"; Answer.AI's
    FSDP-QLoRA work). One process, DDP and ZeRO-2 keep the default.
    """
    if spec.method != "qlora" or not is_distributed(spec):
        return None
    if spec.distribution.strategy not in ("fsdp", "zero3"):
        return None
    return TORCH_DTYPE_NAME[spec.precision]


def pure_16bit(spec: RunSpec) -> bool:
    """True when the spec asks for a pure 16-bit full fine-tune (master_dtype bf16/fp16): the model is loaded in
    that dtype and trained without autocast, so the engines must not turn mixed precision on (under FSDP,
    accelerate's ``fsdp2_prepare_model`` upcasts every trainable parameter to fp32 when ``mixed_precision`` is
    not "no"). The recipe's ``pure_16bit(run)`` is the same question after the device's fallbacks."""
    return spec.method == "full" and spec.master_dtype != "fp32"


def mixed_precision(spec: RunSpec) -> str:
    """accelerate's ``mixed_precision`` for this spec: the spec's precision, or "no" for pure 16-bit.

    ``accelerate launch`` exports it as ``ACCELERATE_MIXED_PRECISION``, which ``TrainingArguments`` reads as its
    own ``mixed_precision`` when neither ``bf16`` nor ``fp16`` is set (transformers training_args.py), so a
    "bf16" here would bring autocast and FSDP's fp32 upcast back into a pure bf16 run.
    """
    return "no" if pure_16bit(spec) else MIXED_PRECISION[spec.precision]


def on_cpu(spec: RunSpec) -> bool:
    """True when the ranks will run on CPU (device cpu, or auto without a CUDA device here)."""
    if spec.device == "cpu":
        return True
    if spec.device == "cuda":
        return False
    import torch

    return not torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------- launch


def launch_command(spec: RunSpec, run_dir: Path, *, resume: bool = False) -> list[str]:
    """The argv that starts the run (all local ranks of this node). Run it with cwd = the repository root.

    One process: ``python -m runner.train.worker RUN_DIR``. Several: ``python -m torch.distributed.run`` (the
    venv's torchrun) with ``--standalone`` for one node or a static rendezvous at master_addr:master_port for
    several, or ``python -m accelerate.commands.launch --config_file RUN_DIR/accelerate_config.yaml`` (call
    :func:`write_engine_configs` first).
    """
    run_dir = Path(run_dir)
    worker = ["-m", WORKER_MODULE, str(run_dir)] + (["--resume"] if resume else [])
    if not is_distributed(spec):
        return [sys.executable] + worker
    dist = spec.distribution
    if dist.launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(run_dir / ACCELERATE_CONFIG)] + worker
    return [sys.executable, "-m", "torch.distributed.run"] + torchrun_args(spec) + worker


def torchrun_args(spec: RunSpec) -> list[str]:
    """torchrun's own options for this spec (without the program), e.g. ``--nproc_per_node 2 --standalone``."""
    dist = spec.distribution
    args = ["--nproc_per_node", str(dist.nproc_per_node)]
    if dist.nnodes == 1:
        # --standalone: a local c10d store on a free port, so two runs on one machine never collide.
        return args + ["--standalone"]
    return args + ["--nnodes", str(dist.nnodes), "--node_rank", str(dist.node_rank),
                   "--master_addr", dist.master_addr, "--master_port", str(dist.master_port)]


def rank_log_path(run_dir: Path, rank: int) -> Path:
    """The log file of global rank ``rank`` in the run folder: ``log.rank<N>.txt``."""
    return Path(run_dir) / f"log.rank{int(rank)}.txt"


def redirect_rank_output(run_dir: Path) -> Path | None:
    """Keep this rank's stdout+stderr in ``log.rank<RANK>.txt``; call first thing in the worker.

    Does nothing in a single-process run (returns None). Ranks other than 0 move file descriptors 1 and 2
    onto their own file (append). Rank 0 keeps writing where the launcher's output goes when that is a
    regular file (the job manager's ``log.txt``, a SLURM output file) so the app's log view shows training
    progress, and ``log.rank0.txt`` becomes a symbolic link to it; otherwise (a terminal or a pipe) rank 0 is
    redirected like the others. Returns the rank's log path.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    rank = int(os.environ.get("RANK", "0"))
    path = rank_log_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    if rank == 0 and _stdout_is_regular_file():
        target = Path(os.path.realpath(f"/proc/self/fd/{sys.stdout.fileno()}"))
        if target.resolve() != path.resolve():
            if path.is_symlink() or path.exists():
                path.unlink()
            try:
                rel = os.path.relpath(target, path.parent)
            except ValueError:  # different drives (not on Linux); keep the absolute target
                rel = str(target)
            path.symlink_to(rel)
        return path
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return path


def _stdout_is_regular_file() -> bool:
    try:
        return stat.S_ISREG(os.fstat(sys.stdout.fileno()).st_mode) and Path("/proc/self/fd").is_dir()
    except (OSError, ValueError):
        return False


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched by torchrun/accelerate): the rank that writes files."""
    return int(os.environ.get("RANK", "0")) == 0


def prepare_for_training(trainer) -> bool:
    """Let ``trainer.train()`` wrap the model for DDP even when ``trainer.evaluate()`` ran first. Call it right
    before ``trainer.train(...)``; returns True when it had to undo an evaluation-mode prepare.

    Why (found by the two-rank test on CPU, accelerate 1.15 + transformers 5.24): ``Trainer.evaluate()`` calls
    ``accelerator.prepare_model(model, evaluation_mode=True)``, which marks the model ``_is_accelerate_prepared``
    without wrapping it; since accelerate PR #3977 ("Prevent double-wrapping models in prepare_model()") the
    training prepare then returns the bare model, so no DistributedDataParallel is applied and every rank
    trains its own copy on its own shard (the ranks' adapters diverge silently). Clearing the mark on a model that
    is not wrapped restores the wrap; an already wrapped model (DDP, FSDP, DeepSpeed) is left alone.
    """
    model = getattr(trainer, "model", None)
    if model is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not getattr(model, "_is_accelerate_prepared", False):
        return False
    if getattr(trainer, "model_wrapped", model) is not model:
        return False  # training prepared it already (a second train() call): keep the wrapper
    model._is_accelerate_prepared = False
    return True


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (one all-reduce of one number; ``flag`` as is when
    not distributed). Use it for decisions all ranks must take at the same step, e.g. "stop and save" after a
    SIGUSR1 that reached the ranks at slightly different times: a rank that stops alone leaves the others
    waiting in a collective forever."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return bool(flag)
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def needs_collective_save(spec: RunSpec) -> bool:
    """True when the final weights are sharded across ranks (FSDP, ZeRO-3): then every rank must call
    ``trainer.save_model(out)`` (it gathers the shards and only the main process writes); rank 0 alone calling
    ``model.save_pretrained`` would save its shard only or wait forever for the others. DDP and ZeRO-2 keep full
    weights on every rank, so rank 0 saving alone is right."""
    return is_distributed(spec) and spec.distribution.strategy in ("fsdp", "zero3")


#: Exit codes that mean "this rank did its part": other ranks exit 0 with them so that torchrun, which tears
#: the whole group down (SIGTERM) as soon as one rank exits non-zero, never kills rank 0 while it is still
#: writing the checkpoint, the adapter or result.json. Values from runner/exitcodes.py (COMPLETED, STOPPED).
_DONE_CODES = (0, 6)


def finish_ranks(exit_code: int) -> int:
    """Call at the very end of the worker on every rank; returns the exit code this rank should use.

    After "completed" or "stopped" (outcomes all ranks share): waits at a barrier until every rank got here (so
    rank 0 has written its files before anyone exits), closes the process group, and returns 0 on the other
    ranks, because torchrun treats any non-zero exit as a failure and SIGTERMs the remaining ranks at once.
    Failures and single-process runs: ``exit_code`` unchanged, no waiting.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or exit_code not in _DONE_CODES:
        # A failure on one rank is not a collective outcome: the others may be inside an all-reduce, and a
        # barrier here would wait for ddp_timeout. Exit now; torchrun stops the rest.
        return exit_code
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return exit_code if is_main_process() else 0


# --------------------------------------------------------------------------------------------------- engine configs


def transformer_layer_classes(spec: RunSpec) -> list[str] | None:
    """The decoder-layer class names FSDP wraps, from the model class's ``_no_split_modules``.

    Reads ``config.json`` of a local model folder or of the shipped catalog entry and looks up the class named in
    ``architectures``; None when the model cannot be resolved without the network (transformers then falls back
    to ``_no_split_modules`` itself at run time).
    """
    config = _model_config(spec.model)
    if not config:
        return None
    import transformers

    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        names = list(getattr(cls, "_no_split_modules", None) or [])
        if names:
            return names
    return None


def _model_config(model: str) -> dict | None:
    from ftcore.paths import data_path

    for candidate in (Path(model).expanduser() / "config.json", Path(model).expanduser(),
                      data_path("models", model, "config.json")):
        if candidate.is_file() and candidate.name.endswith(".json"):
            try:
                return json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                return None
    return None


def fsdp_config(spec: RunSpec) -> dict:
    """``TrainingArguments.fsdp_config`` for strategy fsdp (transformers 5.x keys, FSDP2).

    full_shard = ``reshard_after_forward: True``; wrapping per decoder layer; the spec's state-dict type, CPU
    offload of parameters+gradients, and FSDP's own activation checkpointing when the spec asks for gradient
    checkpointing (transformers recommends it over the training argument, which all-gathers twice).
    """
    dist = spec.distribution
    config: dict = {
        "version": FSDP_VERSION,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "SHARDED_STATE_DICT" if dist.fsdp_state_dict == "sharded" else "FULL_STATE_DICT",
        "cpu_offload": bool(dist.offload),
        "activation_checkpointing": bool(spec.gradient_checkpointing),
        # QLoRA: load on rank 0 only and broadcast (the FSDP-QLoRA recipe); harmless for others.
        "cpu_ram_efficient_loading": spec.method == "qlora",
    }
    layers = transformer_layer_classes(spec)
    if layers:
        config["transformer_layer_cls_to_wrap"] = layers
    return config


def deepspeed_config(spec: RunSpec) -> dict:
    """The DeepSpeed JSON for strategies zero2 / zero3, with the spec's batch, precision and clipping values.

    train_batch_size = micro-batch x gradient accumulation x world size (DeepSpeed's definition). Offload moves
    optimizer states to CPU (both stages) and, for ZeRO-3, the parameters too.
    """
    dist = spec.distribution
    if dist.strategy not in ZERO_STAGE:
        raise RunnerError(f"distribution.strategy {dist.strategy!r} is not a DeepSpeed strategy",
                          field="distribution.strategy", fix="use zero2 or zero3 for DeepSpeed")
    stage = ZERO_STAGE[dist.strategy]
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    if dist.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # Save a consolidated 16-bit model/adapter at the end instead of only ZeRO shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict = {
        "train_micro_batch_size_per_gpu": spec.micro_batch_size,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": spec.micro_batch_size * spec.gradient_accumulation_steps * dist.world_size,
        "gradient_clipping": GRADIENT_CLIPPING,
        "bf16": {"enabled": spec.precision == "bf16"},
        "fp16": {"enabled": spec.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": max(1, spec.logging_steps),
        "wall_clock_breakdown": False,
    }
    if dist.offload:
        if spec.optimizer == "adamw":
            # DeepSpeed's CPU Adam runs the offloaded step; "auto" values are filled from TrainingArguments
            # (learning rate, betas, eps, weight decay) by transformers.
            config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                               "weight_decay": "auto"}}
        else:
            # The Trainer's own optimizer (8-bit, SGD, Adafactor) with offloaded states.
            config["zero_force_ds_cpu_optimizer"] = False
    if spec.optimizer != "adamw":
        config["zero_allow_untested_optimizer"] = True
    return config


def accelerate_config(spec: RunSpec, run_dir: Path | str | None = None) -> dict:
    """The ``accelerate launch --config_file`` contents (accelerate 1.x ``ClusterConfig`` keys).

    ``run_dir`` locates ``ds_config.json`` for DeepSpeed; a relative path (e.g. the export bundle's ".")
    keeps the file portable.
    """
    dist = spec.distribution
    if dist.strategy in ZERO_STAGE:
        distributed_type = "DEEPSPEED"
    elif dist.strategy == "fsdp":
        distributed_type = "FSDP"
    else:
        # MULTI_GPU even on CPU: accelerate's MULTI_CPU / --cpu path starts a single process (accelerate
        # #2741, REFERENCE.md); MULTI_GPU goes through torchrun and the worker's TrainingArguments(use_cpu=True)
        # keeps the ranks on CPU with gloo.
        distributed_type = "MULTI_GPU"
    config: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": distributed_type,
        "mixed_precision": mixed_precision(spec),
        "num_processes": dist.world_size,
        "num_machines": dist.nnodes,
        "machine_rank": dist.node_rank,
        "main_process_ip": dist.master_addr,
        "main_process_port": dist.master_port,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": False,  # see MULTI_GPU above: the CPU choice lives in TrainingArguments
        "debug": False,
        "downcast_bf16": "no",
        "main_training_function": "main",
    }
    if distributed_type == "DEEPSPEED":
        ds_path = Path(run_dir) / DEEPSPEED_CONFIG if run_dir is not None else Path(DEEPSPEED_CONFIG)
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(ds_path),
            "zero3_init_flag": dist.strategy == "zero3",
        }
        if dist.nnodes > 1:
            config["deepspeed_config"]["deepspeed_multinode_launcher"] = "standard"
    elif distributed_type == "FSDP":
        fsdp = fsdp_config(spec)
        config["fsdp_config"] = {
            "fsdp_version": fsdp["version"],
            "fsdp_reshard_after_forward": fsdp["reshard_after_forward"],
            "fsdp_auto_wrap_policy": fsdp["auto_wrap_policy"],
            "fsdp_state_dict_type": fsdp["state_dict_type"],
            "fsdp_offload_params": fsdp["cpu_offload"],
            "fsdp_activation_checkpointing": fsdp["activation_checkpointing"],
            "fsdp_cpu_ram_efficient_loading": fsdp["cpu_ram_efficient_loading"],
        }
        if "transformer_layer_cls_to_wrap" in fsdp:
            config["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] = ",".join(
                fsdp["transformer_layer_cls_to_wrap"])
    return config


def write_engine_configs(spec: RunSpec, run_dir: Path, *, config_dir_ref: str | None = None) -> list[Path]:
    """Write the engine's own config files into ``run_dir``; returns the paths written (none for one process).

    ``config_dir_ref`` is how the accelerate config refers to the folder holding ``ds_config.json``
    (default: the absolute ``run_dir``; the export bundle passes "." so the bundle can move).
    """
    if not is_distributed(spec):
        return []
    import yaml

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ref = config_dir_ref if config_dir_ref is not None else str(run_dir.resolve())
    path = run_dir / ACCELERATE_CONFIG
    path.write_text(yaml.safe_dump(accelerate_config(spec, ref), sort_keys=False), encoding="utf-8")
    written.append(path)
    if spec.distribution.strategy in ZERO_STAGE:
        path = run_dir / DEEPSPEED_CONFIG
        path.write_text(json.dumps(deepspeed_config(spec), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    elif spec.distribution.strategy == "fsdp":
        path = run_dir / FSDP_CONFIG
        path.write_text(json.dumps(fsdp_config(spec), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


def check_strategy(spec: RunSpec) -> None:
    """Refuse a strategy this machine cannot run, instead of letting the engine quietly run something else.

    On CPU, accelerate 1.x applies an FSDP plugin only to GPU-like distributed types and otherwise trains plain
    DDP (accelerate/state.py: the FSDP switch sits under MULTI_GPU/XPU/NPU...; measured here: strategy fsdp on
    CPU trained as DistributedDataParallel), and DeepSpeed's CPU backend needs oneCCL. ZeRO needs the deepspeed
    package. Raises RunnerError naming ``distribution.strategy``.
    """
    strategy = spec.distribution.strategy
    if not is_distributed(spec) or strategy == "ddp":
        return
    if on_cpu(spec):
        raise RunnerError(
            f"distribution.strategy {strategy} needs GPUs: on CPU accelerate would silently train plain DDP "
            f"({'FSDP' if strategy == 'fsdp' else 'DeepSpeed'} is not run on CPU)",
            field="distribution.strategy", kind="bad_spec",
            fix="use strategy ddp on CPU, or run on GPUs (ftadvisor export writes a bundle for a GPU machine)")
    if strategy in ZERO_STAGE:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise RunnerError(f"distribution.strategy {strategy} needs DeepSpeed, which is not installed",
                              field="distribution.strategy", kind="missing_dependency",
                              fix="pip install deepspeed (it compiles its CUDA ops on first use), or use fsdp")


def training_args_overrides(spec: RunSpec, *, check: bool = True) -> dict:
    """Keyword arguments the worker merges into ``TrainingArguments`` (empty for one process).

    DDP: ``ddp_backend="gloo"`` on CPU (NCCL needs GPUs), ``ddp_find_unused_parameters=False`` for LoRA/QLoRA
    (every adapter is used each step; the default True costs a graph walk and breaks with recompute).
    FSDP: ``fsdp=True`` + :func:`fsdp_config`; the spec's gradient checkpointing moves into the FSDP config, so
    ``gradient_checkpointing`` is turned off here. DeepSpeed: ``deepspeed=`` the config dict (the same contents
    as ``ds_config.json``) and ``max_grad_norm`` equal to its clipping value. ``check`` (default) first refuses a
    strategy this machine cannot run (:func:`check_strategy`).
    """
    if not is_distributed(spec):
        return {}
    if check:
        check_strategy(spec)
    overrides: dict = {"ddp_timeout": DDP_TIMEOUT_S}
    if on_cpu(spec):
        overrides["ddp_backend"] = "gloo"
        overrides["use_cpu"] = True
    if spec.method in ("lora", "qlora"):
        overrides["ddp_find_unused_parameters"] = False
    strategy = spec.distribution.strategy
    if strategy == "fsdp":
        overrides["fsdp"] = True
        overrides["fsdp_config"] = fsdp_config(spec)
        overrides["activation_checkpointing"] = False  # transformers 5 name
        overrides["gradient_checkpointing"] = False  # its deprecated alias, in case the worker passes that one
    elif strategy in ZERO_STAGE:
        overrides["deepspeed"] = deepspeed_config(spec)
        overrides["max_grad_norm"] = GRADIENT_CLIPPING
    return overrides


#: Seconds a collective may wait before the process group gives up (transformers' default is 1800 s). Kept at
#: the default: a rank loading a large model or writing a checkpoint can be slow while others wait.
DDP_TIMEOUT_S = 1800
