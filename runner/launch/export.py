"""Export a run as a portable bundle: run the same job on a cluster without this app.

Choice made here: the bundle carries a **copy of the runner's own Python modules** (``src/``: the import closure
of ``runner.train.worker`` inside this project, a few hundred kilobytes of pure Python) instead of a ``train.py`` that
imports a pip-installed finetune-advisor: the project is not on PyPI, and a vendored copy pins the exact recipe
that produced the estimate, so the cluster run is the same code. ``launch.sh`` puts ``src`` on ``PYTHONPATH`` and
starts ``torchrun -m runner.train.worker run`` (or ``accelerate launch``); only the packages in ``requirements.txt`` are
needed.

Layout of the bundle folder::

    README.md            what to install, how to launch on one node, on several, and on SLURM
    spec.json            the RunSpec (dataset paths rewritten to the copies under data/, catalog ids to hub ids)
    launch.sh            executable; plain torchrun / accelerate launch (python -m runner.train.worker for one process)
    slurm.sbatch         SLURM batch script: srun starts one torchrun per node, rendezvous on the first node
    requirements.txt     pinned versions of what the copied modules import (read from importlib.metadata)
    accelerate_config.yaml, ds_config.json | fsdp_config.json   engine configs (multi-process specs)
    data/                copies of the dataset files
    src/                 the copied modules (runner, ftadvisor, ... and the shipped data/ they read)
"""

from __future__ import annotations

import ast
import importlib.metadata
import shlex
import shutil
import stat
import sys
from pathlib import Path

from ftcore.paths import DATA_PACKAGE, REPO_ROOT, data_path
from runner.launch import distributed
from runner.errors import RunnerError
from runner.spec import RunSpec

#: First-party top-level packages; imports of these are copied into the bundle, everything else is a requirement.
FIRST_PARTY = ("runner", "ftcore", "ftadvisor", "estimator", "advisor", "ui")

#: The module the bundle runs; its import closure (including imports inside functions) is copied.
ENTRY_MODULE = "runner.train.worker"

#: Always pinned, whatever the AST walk finds: the training stack (the issue's list) plus the tokenizer and
#: weight formats transformers loads. deepspeed is handled separately (see :func:`requirements`).
CORE_REQUIREMENTS = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                     "tokenizers", "safetensors", "pydantic", "pyyaml")

#: Imports whose distribution name differs from the module name and that ``packages_distributions`` may miss.
MODULE_TO_DIST = {"yaml": "pyyaml", "google": "protobuf", "sklearn": "scikit-learn"}

#: Modules that must never become a requirement of a training bundle (UI only).
NEVER_REQUIRED = {"streamlit", "plotly", "playwright"}

#: Files of the shipped data package copied next to the modules, as src/ftadvisor_data (ftcore.paths.data_path).
SHIPPED_DATA_MAX_BYTES = 50 * 1024 * 1024  # 50 MiB: the catalog and sample datasets are kilobytes; skip anything big

#: Marker file that tells a bundle folder apart, so a re-export may overwrite it.
MARKER = ".ftadvisor-bundle"

#: SLURM rendezvous port (torchrun's default master port, torch docs "torchrun").
DEFAULT_RDZV_PORT = 29500


# --------------------------------------------------------------------------------------------------- public


def export_bundle(spec: RunSpec, out_dir: Path, zip: bool = False, *, overwrite: bool = False,
                  gpu: str | None = None) -> Path:
    """Write the bundle folder ``out_dir``; returns it, or the ``.zip`` next to it when ``zip`` is true.

    Refuses a non-empty folder that is not an earlier bundle (RunnerError on field ``output``) unless
    ``overwrite``. ``gpu`` (a GPU catalog id) adds the per-GPU memory estimate of this spec to the README; a GPU
    or spec the estimator refuses raises its UserError before anything is written. Never touches the network.
    """
    estimate = memory_lines(spec, gpu) if gpu else None
    out_dir = Path(out_dir).expanduser().resolve()
    _prepare_folder(out_dir, overwrite)
    portable, notes = portable_spec(spec, out_dir)
    portable.save(out_dir / "spec.json")
    configs = distributed.write_engine_configs(portable, out_dir, config_dir_ref=".")
    modules = copy_modules(out_dir / "src")
    reqs = requirements(portable, modules)
    (out_dir / "requirements.txt").write_text(reqs, encoding="utf-8")
    _write_executable(out_dir / "launch.sh", launch_script(portable))
    _write_executable(out_dir / "slurm.sbatch", slurm_script(portable))
    text = readme(portable, [p.name for p in configs], notes, estimate=estimate)
    (out_dir / "README.md").write_text(text, encoding="utf-8")
    (out_dir / MARKER).write_text("finetune-advisor export bundle\n", encoding="utf-8")
    if not zip:
        return out_dir
    archive = shutil.make_archive(str(out_dir), "zip", root_dir=out_dir.parent, base_dir=out_dir.name)
    return Path(archive)


def portable_spec(spec: RunSpec, out_dir: Path) -> tuple[RunSpec, list[str]]:
    """A copy of ``spec`` that works inside the bundle, and notes on what was changed or must be checked.

    Dataset files are copied to ``out_dir/data`` and referenced relatively (launch.sh runs from the bundle
    folder); a catalog model id becomes its hub id; ``output_dir`` is dropped (the run folder is ``run/``).
    """
    data = spec.model_dump()
    notes: list[str] = []
    data["output_dir"] = None
    if spec.device == "cpu" and distributed.is_distributed(spec):
        notes.append("device is cpu in spec.json (gloo backend); set \"device\" to \"auto\" to train on the "
                     "cluster's GPUs")
    data["model"], model_note = _portable_model(spec.model)
    if model_note:
        notes.append(model_note)
    for key in ("path", "eval_path"):
        value = data["dataset"].get(key)
        if not value:
            continue
        src = Path(value).expanduser()
        if src.is_file():
            dest = out_dir / "data" / src.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            data["dataset"][key] = f"data/{src.name}"
        else:
            notes.append(f"dataset.{key} {value!r} does not exist on this machine: copy the file into the bundle's "
                         f"data/ folder and set dataset.{key} in spec.json to data/<file name>")
    return RunSpec.model_validate(data), notes


def copy_modules(dest: Path) -> list[str]:
    """Copy the first-party modules ``runner.train.worker`` needs (and the shipped data folder) under ``dest``.

    Returns the dotted module names copied, sorted.
    """
    modules = module_closure(ENTRY_MODULE)
    if dest.exists():
        shutil.rmtree(dest)
    for name in modules:
        src = _module_file(name)
        rel = src.relative_to(REPO_ROOT)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    data_root = data_path()
    if "ftcore.paths" in modules and data_root.is_dir():
        for path in sorted(data_root.rglob("*")):
            if path.is_file() and path.stat().st_size <= SHIPPED_DATA_MAX_BYTES and "__pycache__" not in path.parts:
                target = dest / DATA_PACKAGE / path.relative_to(data_root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    return modules


def module_closure(entry: str) -> list[str]:
    """Every first-party module reachable from ``entry`` by import statements (top level or inside functions),
    plus the packages' ``__init__`` modules. Found by reading the source (``ast``), not by importing it."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages' __init__
            todo.append(".".join(parts[:i]))
        for imported in _imports(path, name):
            if imported.split(".")[0] in FIRST_PARTY:
                todo.append(imported)
    return sorted(seen)


def third_party_imports(modules: list[str]) -> set[str]:
    """Top-level names of non-first-party, non-stdlib modules imported by ``modules``."""
    found: set[str] = set()
    for name in modules:
        path = _module_file(name)
        if path is None:
            continue
        for imported in _imports(path, name):
            top = imported.split(".")[0]
            if top and top not in FIRST_PARTY and top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
    return found


def requirements(spec: RunSpec, modules: list[str]) -> str:
    """``requirements.txt`` text: ``name==version`` for the core stack and what the copied modules import.

    Versions come from ``importlib.metadata`` of this environment (what the estimate and the local runs used).
    deepspeed, when the strategy needs it and it is not installed here, is listed unpinned with a note.
    """
    dists: set[str] = {d for d in CORE_REQUIREMENTS}
    by_module = importlib.metadata.packages_distributions()
    for top in third_party_imports(modules):
        if top in NEVER_REQUIRED:
            continue
        names = by_module.get(top) or [MODULE_TO_DIST.get(top, top)]
        dists.update(n.lower() for n in names)
    dists = {MODULE_TO_DIST.get(d, d).lower() for d in dists} - NEVER_REQUIRED
    lines = ["# Pinned from the environment that produced this bundle (importlib.metadata).",
             "# torch: install the build for your CUDA version first if pip's default does not match it,",
             "# e.g. pip install torch==<version> --index-url https://download.pytorch.org/whl/cu124"]
    missing = []
    for dist in sorted(dists):
        version = _version(dist)
        if version is None:
            missing.append(dist)
            continue
        lines.append(f"{dist}=={_public_version(version)}")
    if spec.distribution.strategy in distributed.ZERO_STAGE and distributed.is_distributed(spec):
        version = _version("deepspeed")
        if version:
            lines.append(f"deepspeed=={_public_version(version)}")
        else:
            lines += ["# DeepSpeed (ZeRO) is required by this spec's strategy but was not installed where the bundle",
                      "# was made; install the release that matches your CUDA toolkit (it compiles its ops on first use):",
                      "deepspeed"]
    for dist in missing:
        lines.append(f"# {dist}: imported by the runner but not installed here; install it if the run needs it")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- scripts


# Shared by launch.sh and slurm.sbatch once HERE is known: the vendored runner on the path, the run folder with
# its spec.json (kept on resume).
_RUN_DIR_SETUP = """cd "$HERE"
export PYTHONPATH="$HERE/src${PYTHONPATH:+:$PYTHONPATH}"
export FTADVISOR_HOME="${FTADVISOR_HOME:-$HERE/home}"
RUN_DIR="${RUN_DIR:-$HERE/run}"
mkdir -p "$RUN_DIR"
[ -f "$RUN_DIR/spec.json" ] || cp "$HERE/spec.json" "$RUN_DIR/spec.json"
"""


def launch_script(spec: RunSpec) -> str:
    """The bash launcher: one process, torchrun, or accelerate launch, from the bundle folder.

    NODE_RANK, MASTER_ADDR and MASTER_PORT may be overridden from the environment (multi-node by hand);
    the process counts are fixed by the spec because the DeepSpeed batch size depends on them.
    """
    dist = spec.distribution
    head = f"""#!/usr/bin/env bash
# Generated by finetune-advisor (ftadvisor export). Starts the run described in spec.json.
# Usage: ./launch.sh            start (the run folder is ./run, or $RUN_DIR)
#        ./launch.sh --resume   continue from the last checkpoint in the run folder
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
{_RUN_DIR_SETUP}PYTHON="${{PYTHON:-python}}"
"""
    if not distributed.is_distributed(spec):
        return head + 'exec "$PYTHON" -m runner.train.worker "$RUN_DIR" "$@"\n'
    env = f"""NODE_RANK="${{NODE_RANK:-{dist.node_rank}}}"
MASTER_ADDR="${{MASTER_ADDR:-{dist.master_addr}}}"
MASTER_PORT="${{MASTER_PORT:-{dist.master_port}}}"
echo "rank logs: $RUN_DIR/log.rank<N>.txt" >&2
"""
    if dist.launcher == "accelerate":
        cmd = ('exec accelerate launch --config_file "$HERE/accelerate_config.yaml" '
               '--machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" '
               '-m runner.train.worker "$RUN_DIR" "$@"\n')
    elif dist.nnodes == 1:
        cmd = f'exec torchrun --standalone --nproc_per_node {dist.nproc_per_node} -m runner.train.worker "$RUN_DIR" "$@"\n'
    else:
        cmd = (f'exec torchrun --nproc_per_node {dist.nproc_per_node} --nnodes {dist.nnodes} '
               '--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" '
               '-m runner.train.worker "$RUN_DIR" "$@"\n')
    return head + env + cmd


def slurm_script(spec: RunSpec) -> str:
    """A SLURM batch script: one task per node, each runs torchrun for its GPUs; c10d rendezvous on the first
    node of the allocation (host from ``scontrol show hostnames``, id from ``SLURM_JOB_ID``)."""
    dist = spec.distribution
    name = _job_name(spec)
    return f"""#!/bin/bash
# Generated by finetune-advisor (ftadvisor export). Submit from the bundle folder: sbatch slurm.sbatch
# (SLURM runs a copy of this script, so the bundle is found through SLURM_SUBMIT_DIR; use a shared file system.)
# One task per node; each task runs torchrun with {dist.nproc_per_node} process(es), one per GPU.
#SBATCH --job-name={name}
#SBATCH --nodes={dist.nnodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={dist.nproc_per_node}
#SBATCH --output=slurm-%j.out
set -euo pipefail
HERE="${{SLURM_SUBMIT_DIR:-$(pwd)}}"
{_RUN_DIR_SETUP}export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${{MASTER_PORT:-{DEFAULT_RDZV_PORT}}}"
export RUN_DIR
# Add --resume at the end of the torchrun line to continue from the last checkpoint.
srun --kill-on-bad-exit=1 bash -c 'torchrun \\
    --nnodes "$SLURM_NNODES" --nproc_per_node {dist.nproc_per_node} \\
    --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \\
    -m runner.train.worker "$RUN_DIR"'
"""


def memory_lines(spec: RunSpec, gpu: str) -> list[str]:
    """README lines with the per-GPU estimate of ``spec`` on catalog GPU ``gpu``, through the one spec -> request
    mapping (runner.estimate_request) the app and the advisor use."""
    from estimator import estimate
    from runner.estimate_request import estimate_request

    est = estimate(estimate_request(spec, gpu=gpu))
    gib = 2 ** 30
    verdict = "fits" if est.fits else "does not fit"
    return [f"- peak {est.memory.peak_bytes / gib:.1f} GiB per GPU of {est.gpu.memory_bytes / gib:.1f} GiB on "
            f"{est.gpu.count} x {est.gpu.name} ({verdict}; peak during {est.memory.peak_phase})"]


def readme(spec: RunSpec, configs: list[str], notes: list[str], estimate: list[str] | None = None) -> str:
    """The bundle's README: what it is, install, launch (one node, several, SLURM), where the results go."""
    dist = spec.distribution
    strategy = {"ddp": "DDP (each GPU holds a full replica)", "fsdp": "FSDP full shard (FSDP2)",
                "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[dist.strategy]
    layout = (f"{dist.nnodes} node(s) x {dist.nproc_per_node} process(es) = {dist.world_size} rank(s), "
              f"{strategy}{', CPU offload' if dist.offload else ''}" if distributed.is_distributed(spec)
              else "one process")
    lines = [
        f"# Fine-tuning bundle: {spec.name or spec.model} ({spec.method})",
        "",
        "Generated by finetune-advisor. Runs without the app: the runner's own modules are copied into `src/`.",
        "",
        f"- model: `{spec.model}`; method: {spec.method}; precision: {spec.precision}",
        f"- layout: {layout}",
        f"- micro-batch {spec.micro_batch_size} x accumulation {spec.gradient_accumulation_steps}"
        f" x {dist.world_size} rank(s) = {spec.micro_batch_size * spec.gradient_accumulation_steps * dist.world_size}"
        f" sequences of up to {spec.seq_len} tokens per optimizer step",
        f"- engine configs: {', '.join(configs) if configs else 'none (one process)'}",
        "",
        "## Install",
        "```bash",
        "python -m venv .venv && . .venv/bin/activate",
        "pip install -r requirements.txt",
        "```",
        "",
        "## Run",
        "```bash",
        "./launch.sh            # start; results in ./run (or $RUN_DIR)",
        "./launch.sh --resume   # continue from the last checkpoint",
        "```",
    ]
    if dist.nnodes > 1:
        lines += ["", f"Several nodes by hand: on node k (0..{dist.nnodes - 1}) run "
                      "`NODE_RANK=k MASTER_ADDR=<node 0 host> ./launch.sh` with the bundle on a shared file system.",
                  "", "On SLURM: `sbatch slurm.sbatch` (one torchrun per node, rendezvous on the first node)."]
    elif distributed.is_distributed(spec):
        lines += ["", "On SLURM: `sbatch slurm.sbatch`."]
    lines += [
        "",
        "## Results (in the run folder)",
        "`metrics.jsonl` (loss per step), `checkpoint-N/`, `adapter/` (LoRA/QLoRA) or `model/` (full), "
        "`report.json`, `result.json`; each rank's log in `log.rank<N>.txt`. Only rank 0 writes files.",
        "",
        "Change the number of processes or nodes by exporting again: the DeepSpeed batch size and the accelerate "
        "config are computed from them.",
    ]
    if estimate:
        lines += ["", "## Memory estimate (finetune-advisor's estimator)"] + estimate
    if notes:
        lines += ["", "## Check before running"] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------- helpers


def _prepare_folder(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise RunnerError(f"output {out_dir} is a file", field="output", fix="give a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (overwrite or (out_dir / MARKER).is_file()):
            raise RunnerError(f"output folder {out_dir} is not empty", field="output",
                              fix="give a new or empty folder (an earlier bundle folder is overwritten)")
        for child in out_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _portable_model(model: str) -> tuple[str, str | None]:
    """(model reference for the bundle, note). Catalog ids become hub ids; local folders stay, with a note."""
    path = Path(model).expanduser()
    if path.exists():
        return model, (f"model {model!r} is a folder on this machine: copy it to the cluster and set \"model\" "
                       "in spec.json to its path there (or to a hub id)")
    hub_id = _catalog_hub_id(model)
    if hub_id:
        return hub_id, f"model catalog id {model!r} was replaced by its hub id {hub_id!r} (downloaded on first run)"
    return model, None


def _catalog_hub_id(model: str) -> str | None:
    catalog = data_path("models", "catalog.yaml")
    if not catalog.is_file():
        return None
    import yaml

    entries = yaml.safe_load(catalog.read_text(encoding="utf-8")) or {}
    entry = entries.get(model.strip().lower()) if isinstance(entries, dict) else None
    return entry.get("hub_id") if isinstance(entry, dict) else None


def _module_file(name: str) -> Path | None:
    """Source file of a first-party module (package -> its __init__.py), or None when it does not exist."""
    base = REPO_ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path, module: str) -> list[str]:
    """Dotted names imported by a source file, relative imports resolved, ``from a import b`` giving both
    ``a`` and ``a.b`` (b may be a submodule)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base:
                found.append(base)
                found += [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]
    return found


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _public_version(version: str) -> str:
    """Drop a local version label (``2.13.0+cpu`` -> ``2.13.0``): PyPI serves no local versions (PEP 440)."""
    return version.split("+", 1)[0]


def _job_name(spec: RunSpec) -> str:
    raw = spec.name or f"ftadvisor-{spec.method}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)[:64]


def _write_executable(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def launch_line(spec: RunSpec) -> str:
    """The launch.sh command line as one shell-quoted string (for display in the app)."""
    return " ".join(shlex.quote(part) for part in distributed.launch_command(spec, Path("run")))


__all__ = ["export_bundle", "portable_spec", "copy_modules", "module_closure", "requirements", "launch_script",
           "slurm_script", "readme", "launch_line"]
