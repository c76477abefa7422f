"""The export bundle: files, scripts that really run (with stand-in torchrun/python that record their
arguments), configs that parse, pinned requirements, the vendored runner importable on its own, the zip, the CLI,
and a real training run started from the bundle's launch.sh."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from ftadvisor.cli import main as cli_main
from ftcore.paths import data_path
from runner.errors import RunnerError
from runner.launch.export import MARKER, export_bundle, module_closure
from runner.spec import DatasetSpec, DistributionSpec, RunSpec

#: The training stack the issue asks to pin (plus what the copied modules import).
PINNED = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")


@pytest.fixture
def dataset(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"Q{i}: {i}+{i}=", "completion": f" {2 * i}"} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def _spec(dataset: Path, **kw) -> RunSpec:
    dist = kw.pop("distribution", {})
    fields = dict(model="llama-2-7b", method="qlora", dataset=DatasetSpec(path=str(dataset)), micro_batch_size=2,
                  gradient_accumulation_steps=4, distribution=DistributionSpec(**dist))
    fields.update(kw)
    return RunSpec(**fields)


def _fake_bin(folder: Path, name: str) -> Path:
    """A stand-in executable that records its argv (one per line) and PYTHONPATH/cwd in $RECORD."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text('#!/bin/sh\n{ echo "CWD=$(pwd)"; echo "PYTHONPATH=$PYTHONPATH"; printf "%s\\n" "$@"; } > "$RECORD"\n')
    path.chmod(0o755)
    return path


def _run_script(script: Path, tmp_path: Path, *args: str, env_extra=None) -> list[str]:
    fake = tmp_path / "fakebin"
    for name in ("torchrun", "accelerate", "python", "srun", "scontrol"):
        _fake_bin(fake, name)
    record = tmp_path / "record.txt"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", RECORD=str(record), **(env_extra or {}))
    env.pop("PYTHONPATH", None)
    out = subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return record.read_text().splitlines()


def test_multinode_zero3_bundle(tmp_path, dataset):
    spec = _spec(dataset, distribution=dict(nproc_per_node=4, nnodes=2, master_addr="10.1.2.3", master_port=29555,
                                            strategy="zero3", offload=True))
    out = export_bundle(spec, tmp_path / "bundle")
    assert out == (tmp_path / "bundle").resolve()
    names = {p.name for p in out.iterdir()}
    assert {"spec.json", "launch.sh", "slurm.sbatch", "requirements.txt", "README.md", "accelerate_config.yaml",
            "ds_config.json", "data", "src", MARKER} <= names
    for script in ("launch.sh", "slurm.sbatch"):
        assert os.stat(out / script).st_mode & stat.S_IXUSR
        assert subprocess.run(["bash", "-n", str(out / script)]).returncode == 0

    bundled = RunSpec.load(out / "spec.json")
    # The catalog id became its hub id (from the shipped catalog), the dataset a relative copy.
    catalog = yaml.safe_load(data_path("models", "catalog.yaml").read_text())
    assert bundled.model == catalog["llama-2-7b"]["hub_id"]
    assert bundled.dataset.path == "data/qa.jsonl"
    assert (out / "data" / "qa.jsonl").read_bytes() == dataset.read_bytes()
    assert bundled.output_dir is None and bundled.distribution == spec.distribution

    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 2 * 4 * 8 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    acc = yaml.safe_load((out / "accelerate_config.yaml").read_text())
    assert acc["deepspeed_config"]["deepspeed_config_file"] == "ds_config.json"  # relative: the bundle can move
    assert (acc["num_processes"], acc["num_machines"], acc["main_process_ip"]) == (8, 2, "10.1.2.3")

    readme = (out / "README.md").read_text()
    assert "2 node(s) x 4 process(es) = 8 rank(s)" in readme and "ZeRO-3" in readme and "sbatch slurm.sbatch" in readme


def test_launch_script_runs_torchrun_with_the_spec(tmp_path, dataset):
    from torch.distributed.run import get_args_parser

    spec = _spec(dataset, distribution=dict(nproc_per_node=4, nnodes=2, master_addr="10.1.2.3", master_port=29555,
                                            strategy="fsdp"))
    out = export_bundle(spec, tmp_path / "bundle")
    lines = _run_script(out / "launch.sh", tmp_path, "--resume", env_extra={"NODE_RANK": "1"})
    assert lines[0] == f"CWD={out}" and lines[1].startswith(f"PYTHONPATH={out}/src")
    args = get_args_parser().parse_args(lines[2:])
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "2", 1)
    assert (args.master_addr, args.master_port) == ("10.1.2.3", 29555)
    assert args.module and args.training_script == "runner.train.worker"
    assert args.training_script_args == [f"{out}/run", "--resume"]
    assert RunSpec.load(out / "run" / "spec.json") == RunSpec.load(out / "spec.json")


def test_single_process_and_accelerate_launchers(tmp_path, dataset):
    from accelerate.commands.launch import launch_command_parser

    one = export_bundle(_spec(dataset, method="lora"), tmp_path / "one")
    lines = _run_script(one / "launch.sh", tmp_path, env_extra={"PYTHON": str(tmp_path / "fakebin" / "python")})
    assert lines[2:] == ["-m", "runner.train.worker", f"{one}/run"]
    assert not (one / "accelerate_config.yaml").exists() and not (one / "ds_config.json").exists()

    spec = _spec(dataset, distribution=dict(nproc_per_node=2, launcher="accelerate", strategy="zero2"))
    acc = export_bundle(spec, tmp_path / "acc")
    lines = _run_script(acc / "launch.sh", tmp_path)
    assert lines[2] == "launch"
    args = launch_command_parser().parse_args(lines[3:])
    assert args.config_file == f"{acc}/accelerate_config.yaml" and args.module
    assert args.training_script == "runner.train.worker" and args.machine_rank == 0


def test_slurm_script_starts_one_torchrun_per_node(tmp_path, dataset):
    spec = _spec(dataset, name="llama 7b/qlora", distribution=dict(nproc_per_node=8, nnodes=4, strategy="zero2"))
    out = export_bundle(spec, tmp_path / "bundle")
    text = (out / "slurm.sbatch").read_text()
    assert "#SBATCH --nodes=4" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --job-name=llama-7b-qlora" in text
    # Run it with stand-ins: scontrol lists the nodes, srun runs its command (as on each node), torchrun records.
    fake = tmp_path / "fakebin"
    _fake_bin(fake, "torchrun")
    (fake / "scontrol").write_text('#!/bin/sh\nprintf "gpu01\\ngpu02\\ngpu03\\ngpu04\\n"\n')
    (fake / "srun").write_text('#!/bin/sh\nshift\nexec "$@"\n')  # drop --kill-on-bad-exit=1
    for name in ("scontrol", "srun"):
        (fake / name).chmod(0o755)
    record = tmp_path / "record.txt"
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", RECORD=str(record), SLURM_SUBMIT_DIR=str(out),
               SLURM_JOB_NODELIST="gpu[01-04]", SLURM_NNODES="4", SLURM_JOB_ID="4242")
    env.pop("PYTHONPATH", None)
    res = subprocess.run(["bash", str(out / "slurm.sbatch")], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = record.read_text().splitlines()
    assert lines[0] == f"CWD={out}" and lines[1].startswith(f"PYTHONPATH={out}/src")
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(lines[2:])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("4", "8", "c10d")
    assert (args.rdzv_endpoint, args.rdzv_id) == ("gpu01:29500", "4242")
    assert args.module and args.training_script == "runner.train.worker" and args.training_script_args == [f"{out}/run"]


def test_requirements_are_pinned_to_this_environment(tmp_path, dataset):
    spec = _spec(dataset, distribution=dict(nproc_per_node=2, strategy="zero3"))
    out = export_bundle(spec, tmp_path / "bundle")
    pins = {}
    for line in (out / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#") and "==" in line:
            name, version = line.split("==")
            pins[name] = version
    for dist in PINNED:
        assert pins[dist] == importlib.metadata.version(dist).split("+")[0], dist
    assert "streamlit" not in pins and "finetune-advisor" not in pins
    # deepspeed is required by ZeRO: pinned when installed here, otherwise listed with a note.
    lines = (out / "requirements.txt").read_text().splitlines()
    assert any(line.split("==")[0] == "deepspeed" for line in lines)


def test_vendored_runner_imports_from_the_bundle_alone(tmp_path, dataset):
    out = export_bundle(_spec(dataset), tmp_path / "bundle")
    modules = module_closure("runner.train.worker")
    assert {"runner.train.worker", "runner.train.recipe", "runner.launch.distributed", "runner.spec", "ftcore.paths"} <= set(modules)
    assert "runner.jobs.manager" not in modules and not any(m.startswith(("ui", "advisor")) for m in modules)
    probe = ("import runner.train.worker, runner.train.recipe, runner.launch.distributed, ftcore.paths as p; "
             "print(runner.train.worker.__file__); print(runner.train.recipe.__file__); print(p.data_path())")
    env = dict(os.environ, PYTHONPATH=str(out / "src"))
    res = subprocess.run([sys.executable, "-c", probe], cwd=out, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    worker_file, recipe_file, data_dir = res.stdout.strip().splitlines()[-3:]
    assert worker_file == str(out / "src" / "runner" / "train" / "worker.py")
    assert recipe_file == str(out / "src" / "runner" / "train" / "recipe.py")
    shipped = out / "src" / "ftadvisor_data"
    assert data_dir == str(shipped) and (shipped / "__init__.py").is_file()
    assert (shipped / "models" / "catalog.yaml").is_file()


def test_zip_keeps_every_file_and_the_executable_bit(tmp_path, dataset):
    archive = export_bundle(_spec(dataset, distribution=dict(nproc_per_node=2)), tmp_path / "b", zip=True)
    assert archive == (tmp_path / "b.zip").resolve() and archive.is_file()
    on_disk = {str(p.relative_to(tmp_path)) for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with zipfile.ZipFile(archive) as zf:
        names = {n for n in zf.namelist() if not n.endswith("/")}
        assert names == on_disk
        assert (zf.getinfo("b/launch.sh").external_attr >> 16) & stat.S_IXUSR
        assert json.loads(zf.read("b/spec.json"))["distribution"]["nproc_per_node"] == 2


def test_refuses_a_foreign_folder_but_replaces_an_earlier_bundle(tmp_path, dataset):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RunnerError) as err:
        export_bundle(_spec(dataset), foreign)
    assert err.value.field == "output" and (foreign / "notes.txt").read_text() == "keep me"
    first = export_bundle(_spec(dataset, distribution=dict(nproc_per_node=2, strategy="zero2")), tmp_path / "b")
    assert (first / "ds_config.json").is_file()
    again = export_bundle(_spec(dataset, distribution=dict(nproc_per_node=2, strategy="fsdp")), tmp_path / "b")
    assert (again / "fsdp_config.json").is_file() and not (again / "ds_config.json").exists()


def test_missing_dataset_and_local_model_are_named_in_the_readme(tmp_path, tiny_model_dir):
    spec = RunSpec(model=str(tiny_model_dir), dataset=DatasetSpec(path=str(tmp_path / "nowhere.jsonl")))
    out = export_bundle(spec, tmp_path / "b")
    readme = (out / "README.md").read_text()
    assert "nowhere.jsonl" in readme and "does not exist on this machine" in readme
    assert "is a folder on this machine" in readme
    assert RunSpec.load(out / "spec.json").model == str(tiny_model_dir)


def test_cli_export(tmp_path, dataset, capsys):
    spec_path = tmp_path / "spec.json"
    _spec(dataset, distribution=dict(nproc_per_node=2, strategy="fsdp")).save(spec_path)
    assert cli_main(["export", str(spec_path), "--output", str(tmp_path / "out"), "--zip"]) == 0
    printed = capsys.readouterr().out
    assert "bundle:" in printed and (tmp_path / "out" / "launch.sh").is_file() and (tmp_path / "out.zip").is_file()


def test_cli_export_bad_spec_names_the_field(tmp_path, dataset, capsys):
    bad = tmp_path / "bad.json"
    data = json.loads(_spec(dataset).model_dump_json())
    data["micro_batch_size"] = 0
    bad.write_text(json.dumps(data))
    assert cli_main(["export", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert "micro_batch_size" in capsys.readouterr().err
    assert cli_main(["export", str(tmp_path / "none.json"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad.write_text("{not json")
    assert cli_main(["export", str(bad), "--output", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_bundle_trains_without_the_app(tmp_path, tiny_model_dir):
    """Copy the bundle away from the repository and run its launch.sh (2 ranks, torchrun, CPU): the adapter
    appears in the bundle's run folder, and each rank kept its log."""
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": f" {2 * i}"}) for i in range(16)))
    spec = RunSpec(model=str(tiny_model_dir), method="lora", dataset=DatasetSpec(path=str(data), eval_fraction=0.25),
                   max_steps=2, save_steps=2, micro_batch_size=2, seq_len=32, precision="fp32", device="cpu",
                   distribution=DistributionSpec(nproc_per_node=2))
    built = export_bundle(spec, tmp_path / "made")
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(built, moved, symlinks=True)
    worker = moved / "src" / "runner" / "train" / "worker.py"
    worker.write_text(worker.read_text().replace("from __future__ import annotations\n",
                                                 "from __future__ import annotations\nprint('BUNDLED WORKER')\n", 1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FTADVISOR_HOME")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = subprocess.run(["./launch.sh"], cwd=moved, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    run = moved / "run"
    assert json.loads((run / "result.json").read_text())["status"] == "completed"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "log.rank0.txt").is_file() and (run / "log.rank1.txt").is_file()
    # Both ranks ran the bundle's copy of the worker, not this repository's (the copy prints a mark on import,
    # before the worker moves its output into the rank log).
    assert out.stdout.count("BUNDLED WORKER") == 2, out.stdout[-2000:]
