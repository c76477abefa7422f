"""Multi-process launch: the command that starts the worker ranks and the engine config files they read.

One process: ``python -m runner.worker RUN_DIR``. Several: ``python -m torch.distributed.run`` (torchrun) or
``accelerate launch`` around the same worker; the engine (DDP, FSDP, DeepSpeed ZeRO) is chosen by
``spec.distribution.strategy`` and handed to ``TrainingArguments`` through :func:`training_args_overrides`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from runner.spec import RunSpec

WORKER_MODULE = "runner.worker"


def is_distributed(spec: RunSpec) -> bool:
    """True when the spec asks for more than one process in total (any node count)."""
    return spec.distribution.world_size > 1


def launch_command(spec: RunSpec, run_dir: Path) -> list[str]:
    """The argv that starts the run (all local ranks of this node). Run it with cwd = repository root."""
    run_dir = Path(run_dir)
    if not is_distributed(spec):
        return [sys.executable, "-m", WORKER_MODULE, str(run_dir)]
    dist = spec.distribution
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dist.nproc_per_node)]
    if dist.nnodes == 1:
        cmd += ["--standalone"]
    else:
        cmd += ["--nnodes", str(dist.nnodes), "--node_rank", str(dist.node_rank),
                "--master_addr", dist.master_addr, "--master_port", str(dist.master_port)]
    return cmd + ["-m", WORKER_MODULE, str(run_dir)]


def write_engine_configs(spec: RunSpec, run_dir: Path) -> list[Path]:
    """Write the engine's own config files into ``run_dir``; returns the paths written (none for one process)."""
    return []


def training_args_overrides(spec: RunSpec) -> dict:
    """Keyword arguments the worker merges into ``TrainingArguments`` (empty for one process)."""
    return {}
