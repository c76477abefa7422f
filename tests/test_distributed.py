"""Launch commands and engine configs generated from the spec, checked by the engines' own parsers and loaders
(torchrun's argument parser, accelerate's config loader and launch parser, transformers' TrainingArguments and
its DeepSpeed consistency check, bitsandbytes' config), without running a multi-GPU engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from ftcore.paths import REPO_ROOT
from runner.launch import distributed as D
from runner.errors import RunnerError
from runner.spec import DatasetSpec, DistributionSpec, RunSpec


def _spec(**kw) -> RunSpec:
    dist = kw.pop("distribution", {})
    return RunSpec(model=kw.pop("model", "smollm2-135m"), dataset=DatasetSpec(path="train.jsonl"),
                   distribution=DistributionSpec(**dist), **kw)


# ------------------------------------------------------------------------------------------------ launch


def test_single_process_runs_the_worker_directly(tmp_path):
    spec = _spec()
    assert D.launch_command(spec, tmp_path) == [sys.executable, "-m", "runner.train.worker", str(tmp_path)]
    assert D.launch_command(spec, tmp_path, resume=True)[-1] == "--resume"
    assert D.write_engine_configs(spec, tmp_path) == [] and not any(tmp_path.iterdir())
    assert D.training_args_overrides(spec) == {}
    assert D.estimator_sharding(spec) == "none"


def test_torchrun_command_parses_as_torchrun_reads_it(tmp_path):
    from torch.distributed.run import get_args_parser

    spec = _spec(distribution=dict(nproc_per_node=4, nnodes=3, node_rank=2, master_addr="node0.cluster",
                                   master_port=29611))
    cmd = D.launch_command(spec, tmp_path, resume=True)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]  # the venv's torchrun
    args = get_args_parser().parse_args(cmd[3:])
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("4", "3", 2)
    assert (args.master_addr, args.master_port, args.standalone) == ("node0.cluster", 29611, False)
    assert args.module and args.training_script == "runner.train.worker"
    assert args.training_script_args == [str(tmp_path), "--resume"]


def test_one_node_uses_standalone_rendezvous(tmp_path):
    from torch.distributed.run import get_args_parser

    cmd = D.launch_command(_spec(distribution=dict(nproc_per_node=2)), tmp_path)
    args = get_args_parser().parse_args(cmd[3:])
    assert args.standalone and args.nproc_per_node == "2"


def test_accelerate_command_and_config_load_with_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    spec = _spec(precision="fp16", distribution=dict(nproc_per_node=8, nnodes=2, node_rank=1,
                                                     master_addr="10.0.0.1", master_port=29700,
                                                     launcher="accelerate"))
    written = D.write_engine_configs(spec, tmp_path)
    cmd = D.launch_command(spec, tmp_path)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(cmd[3:])
    assert Path(args.config_file) == tmp_path / D.ACCELERATE_CONFIG and args.module
    assert args.training_script == "runner.train.worker" and args.training_script_args == [str(tmp_path)]
    assert tmp_path / D.ACCELERATE_CONFIG in written
    cfg = load_config_from_file(str(tmp_path / D.ACCELERATE_CONFIG))
    assert cfg.distributed_type.value == "MULTI_GPU"
    assert (cfg.num_processes, cfg.num_machines, cfg.machine_rank) == (16, 2, 1)
    assert (cfg.main_process_ip, cfg.main_process_port, cfg.mixed_precision) == ("10.0.0.1", 29700, "fp16")
    # MULTI_CPU / --cpu would start only one process (accelerate #2741): the config never asks for it.
    assert cfg.use_cpu is False


# ------------------------------------------------------------------------------------------------ DeepSpeed


@pytest.mark.parametrize("strategy,offload", [("zero2", False), ("zero2", True), ("zero3", False), ("zero3", True)])
def test_deepspeed_json_carries_the_spec(tmp_path, strategy, offload):
    spec = _spec(micro_batch_size=4, gradient_accumulation_steps=8, precision="bf16",
                 distribution=dict(nproc_per_node=4, strategy=strategy, offload=offload))
    D.write_engine_configs(spec, tmp_path)
    ds = json.loads((tmp_path / D.DEEPSPEED_CONFIG).read_text())
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 8
    assert ds["train_batch_size"] == 4 * 8 * 4  # DeepSpeed: micro x accumulation x world size
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == {"zero2": 2, "zero3": 3}[strategy]
    assert ("offload_optimizer" in zero) == offload
    assert ("offload_param" in zero) == (offload and strategy == "zero3")
    if offload:
        assert zero["offload_optimizer"]["device"] == "cpu"
    acc = yaml.safe_load((tmp_path / D.ACCELERATE_CONFIG).read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    assert Path(acc["deepspeed_config"]["deepspeed_config_file"]) == (tmp_path / D.DEEPSPEED_CONFIG).resolve()
    assert acc["deepspeed_config"]["zero3_init_flag"] == (strategy == "zero3")
    # accelerate's own DeepSpeed config reader agrees on stage and offload.
    from accelerate.utils.deepspeed import HfDeepSpeedConfig

    hf = HfDeepSpeedConfig(str(tmp_path / D.DEEPSPEED_CONFIG))
    assert hf.is_zero3() == (strategy == "zero3") and hf.is_offload() == offload


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_json_matches_the_trainer_arguments(tmp_path, precision):
    """transformers' HfTrainerDeepSpeedConfig refuses a DeepSpeed config whose batch, accumulation, clipping or
    precision differ from TrainingArguments. Run that very check (its methods, without deepspeed installed) against
    TrainingArguments built from the same spec the way the recipe builds them."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    spec = _spec(micro_batch_size=2, gradient_accumulation_steps=3, precision=precision, optimizer="adamw",
                 distribution=dict(nproc_per_node=2, nnodes=2, strategy="zero3", offload=True))
    overrides = D.training_args_overrides(spec, check=False)  # deepspeed and GPUs are not needed to check
    ds = overrides.pop("deepspeed")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=spec.micro_batch_size,
                             gradient_accumulation_steps=spec.gradient_accumulation_steps,
                             learning_rate=spec.learning_rate, weight_decay=spec.weight_decay,
                             bf16=precision == "bf16", fp16=precision == "fp16", report_to="none", use_cpu=True,
                             max_grad_norm=overrides["max_grad_norm"])

    class Check(HfDeepSpeedConfig):  # the Trainer's checker on accelerate's base (deepspeed not needed)
        fill_match = HfTrainerDeepSpeedConfig.fill_match
        fill_only = HfTrainerDeepSpeedConfig.fill_only
        trainer_config_process = HfTrainerDeepSpeedConfig.trainer_config_process

    check = Check(json.loads(json.dumps(ds)))
    check.mismatches = []

    class Args:  # TrainingArguments as the ranks see them: world size from the spec
        def __getattr__(self, name):
            return spec.distribution.world_size if name == "world_size" else getattr(args, name)

    check.trainer_config_process(Args())
    assert check.mismatches == []
    # "auto" optimizer values were filled from the arguments (DeepSpeed's CPU Adam runs the offloaded step).
    assert check.config["optimizer"]["params"]["lr"] == spec.learning_rate
    assert check.config["train_batch_size"] == 2 * 3 * 4


def test_deepspeed_with_real_deepspeed_when_installed(tmp_path):
    """DeepSpeed's own parser (batch arithmetic check included). Outside a process group it sees world size 1,
    so the spec asks for one process per node on one node."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional, for ZeRO runs)")
    from deepspeed.runtime.config import DeepSpeedConfig

    for strategy, offload in (("zero2", False), ("zero3", True)):
        spec = _spec(micro_batch_size=2, gradient_accumulation_steps=4,
                     distribution=dict(nproc_per_node=1, strategy=strategy, offload=offload))
        raw = D.deepspeed_config(spec)
        raw["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}} if "optimizer" in raw else None
        cfg = DeepSpeedConfig({k: v for k, v in raw.items() if v is not None})
        assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu) == (8, 2)
        assert cfg.gradient_accumulation_steps == 4 and cfg.bfloat16_config.enabled
        assert cfg.zero_optimization_stage == {"zero2": 2, "zero3": 3}[strategy]
        assert cfg.gradient_clipping == D.GRADIENT_CLIPPING


def test_deepspeed_config_refuses_other_strategies():
    with pytest.raises(RunnerError) as err:
        D.deepspeed_config(_spec(distribution=dict(nproc_per_node=2, strategy="fsdp")))
    assert err.value.field == "distribution.strategy"


# ------------------------------------------------------------------------------------------------ FSDP


def test_fsdp_wraps_the_models_decoder_layer(tiny_model_dir, tiny_qwen_dir):
    import transformers

    for folder, arch in ((tiny_model_dir, "LlamaForCausalLM"), (tiny_qwen_dir, "Qwen2ForCausalLM")):
        spec = _spec(model=str(folder), distribution=dict(nproc_per_node=2, strategy="fsdp"))
        expected = list(getattr(transformers, arch)._no_split_modules)
        assert D.transformer_layer_classes(spec) == expected
        assert D.fsdp_config(spec)["transformer_layer_cls_to_wrap"] == expected
    # Catalog ids read the shipped config.json.
    assert D.transformer_layer_classes(_spec(model="llama-2-7b")) == ["LlamaDecoderLayer"]


def test_fsdp_config_carries_the_spec(tmp_path, tiny_model_dir):
    spec = _spec(model=str(tiny_model_dir), gradient_checkpointing=True, method="qlora",
                 distribution=dict(nproc_per_node=2, strategy="fsdp", offload=True, fsdp_state_dict="sharded"))
    written = {p.name for p in D.write_engine_configs(spec, tmp_path)}
    assert written == {D.ACCELERATE_CONFIG, D.FSDP_CONFIG}
    fsdp = json.loads((tmp_path / D.FSDP_CONFIG).read_text())
    assert fsdp["reshard_after_forward"] is True  # full shard
    assert fsdp["state_dict_type"] == "SHARDED_STATE_DICT" and fsdp["cpu_offload"] is True
    assert fsdp["activation_checkpointing"] is True and fsdp["cpu_ram_efficient_loading"] is True
    acc = yaml.safe_load((tmp_path / D.ACCELERATE_CONFIG).read_text())
    assert acc["distributed_type"] == "FSDP"
    assert acc["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    assert acc["fsdp_config"]["fsdp_offload_params"] is True
    assert acc["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    overrides = D.training_args_overrides(spec, check=False)
    assert overrides["fsdp"] is True and overrides["fsdp_config"] == fsdp
    # FSDP's own recompute replaces the training argument (which would all-gather twice).
    assert overrides["activation_checkpointing"] is False and overrides["gradient_checkpointing"] is False


FSDP_PROBE = textwrap.dedent("""
    import json, sys, tempfile
    from runner.launch import distributed as D
    from runner.spec import RunSpec
    from transformers import TrainingArguments
    from accelerate.utils import FullyShardedDataParallelPlugin
    spec = RunSpec.model_validate_json(sys.argv[1])
    kwargs = dict(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=1, report_to="none",
                  gradient_checkpointing=True)
    kwargs.update(D.training_args_overrides(spec, check=False))  # FSDP itself cannot run on CPU (see below)
    args = TrainingArguments(**kwargs)
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    print(json.dumps({"plugin_args": args.fsdp_plugin_args, "backend": args.ddp_backend,
                      "checkpointing": args.activation_checkpointing,
                      "offload": type(plugin.cpu_offload).__name__, "wrap": plugin.transformer_cls_names_to_wrap,
                      "state_dict": str(plugin.state_dict_type)}))
""")


def test_fsdp_settings_accepted_by_training_arguments_and_accelerate(tmp_path, tiny_model_dir):
    """TrainingArguments(fsdp=...) needs a process group: a one-rank gloo group in a child process."""
    spec = _spec(model=str(tiny_model_dir), device="cpu", gradient_checkpointing=True,
                 distribution=dict(nproc_per_node=2, strategy="fsdp", offload=True, fsdp_state_dict="sharded"))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", FSDP_PROBE, spec.model_dump_json()], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    plugin = got["plugin_args"]
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["cpu_offload"] is True and plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["activation_checkpointing"] is True and got["checkpointing"] is False
    assert got["backend"] == "gloo" and got["offload"] == "CPUOffloadPolicy"
    assert got["wrap"] == ["LlamaDecoderLayer"] and "SHARDED" in got["state_dict"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ DDP, QLoRA


@pytest.mark.parametrize("strategy", ["fsdp", "zero2", "zero3"])
def test_sharded_strategies_are_refused_on_cpu(strategy):
    """accelerate trains plain DDP when given FSDP on CPU (measured in a two-rank run: the model came back
    wrapped in DistributedDataParallel), so the runner refuses instead of running something else."""
    spec = _spec(device="cpu", distribution=dict(nproc_per_node=2, strategy=strategy))
    with pytest.raises(RunnerError) as err:
        D.training_args_overrides(spec)
    assert err.value.field == "distribution.strategy" and "ddp" in err.value.fix
    # One process, or DDP, is always fine.
    assert D.training_args_overrides(_spec(device="cpu", distribution=dict(strategy=strategy))) == {}
    assert D.training_args_overrides(_spec(device="cpu", distribution=dict(nproc_per_node=2)))["ddp_backend"] == "gloo"


def test_zero_needs_deepspeed_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(D, "on_cpu", lambda spec: False)  # as on a GPU machine
    with pytest.raises(RunnerError) as err:
        D.training_args_overrides(_spec(distribution=dict(nproc_per_node=2, strategy="zero3")))
    assert err.value.kind == "missing_dependency" and "pip install deepspeed" in err.value.fix
    assert D.training_args_overrides(_spec(distribution=dict(nproc_per_node=2, strategy="fsdp")))["fsdp"] is True


def test_ddp_overrides_on_cpu():
    lora = D.training_args_overrides(_spec(device="cpu", distribution=dict(nproc_per_node=2)))
    assert lora["ddp_backend"] == "gloo" and lora["use_cpu"] is True
    assert lora["ddp_find_unused_parameters"] is False
    assert "fsdp" not in lora and "deepspeed" not in lora
    full = D.training_args_overrides(_spec(method="full", device="cpu", distribution=dict(nproc_per_node=2)))
    assert "ddp_find_unused_parameters" not in full  # the Trainer's default decides for full fine-tuning


@pytest.mark.parametrize("method,strategy,precision,expected", [
    ("qlora", "fsdp", "bf16", "bfloat16"),
    ("qlora", "zero3", "fp16", "float16"),
    ("qlora", "fsdp", "fp32", "float32"),
    ("qlora", "ddp", "bf16", None),
    ("qlora", "zero2", "bf16", None),
    ("lora", "fsdp", "bf16", None),
])
def test_qlora_quant_storage_matches_model_dtype(method, strategy, precision, expected):
    import torch
    from transformers import BitsAndBytesConfig

    spec = _spec(method=method, precision=precision, distribution=dict(nproc_per_node=2, strategy=strategy))
    assert D.quant_storage_dtype(spec) == expected
    if expected:
        cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_storage=expected)
        assert cfg.bnb_4bit_quant_storage == getattr(torch, expected)
    # One process never changes bitsandbytes' default storage.
    assert D.quant_storage_dtype(_spec(method=method, precision=precision)) is None


# ------------------------------------------------------------------------------------------------ estimator names


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero2", "zero3"])
def test_estimator_sharding_names_are_the_estimators(strategy):
    from typing import get_args

    from estimator.request import Sharding
    from runner.estimate_request import estimate_request

    spec = _spec(distribution=dict(nproc_per_node=4, nnodes=2, strategy=strategy, offload=True))
    assert D.estimator_sharding(spec) == strategy and strategy in get_args(Sharding)
    req = estimate_request(spec, gpu="a100-80gb")
    assert (req.num_gpus, req.sharding, req.offload) == (8, strategy, True)
    assert req.batch_size == spec.micro_batch_size


def test_per_gpu_memory_follows_the_strategy():
    """Full fine-tuning of Llama-2-7B on 8 GPUs: ZeRO-3 holds less per GPU than ZeRO-2, which holds less than DDP
    (ZeRO paper / REFERENCE.md: DDP keeps 18 bytes per parameter per GPU, ZeRO-2 2P + 18P/N, ZeRO-3 shards
    the weights too)."""
    estimate = pytest.importorskip("estimator.engine").estimate
    from runner.estimate_request import estimate_request

    peaks = {}
    for strategy in ("ddp", "zero2", "zero3"):
        spec = _spec(model="llama-2-7b", method="full", distribution=dict(nproc_per_node=8, strategy=strategy))
        peaks[strategy] = estimate(estimate_request(spec, gpu="a100-80gb")).memory.peak_bytes
    assert peaks["zero3"] < peaks["zero2"] < peaks["ddp"]


# ------------------------------------------------------------------------------------------------ rank logs


RANK_PROBE = "import sys; from runner.launch.distributed import redirect_rank_output as r; " \
             "p = r(sys.argv[1]); print('hello from', p); print('err line', file=sys.stderr)"


def _probe(tmp_path, rank, world, stdout):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-c", RANK_PROBE, str(tmp_path)], env=env, cwd=REPO_ROOT,
                          stdout=stdout, stderr=subprocess.STDOUT, timeout=60)


def test_other_ranks_log_to_their_own_file(tmp_path):
    with open(tmp_path / "log.txt", "ab") as launcher_log:
        assert _probe(tmp_path, 1, 2, launcher_log).returncode == 0
    text = D.rank_log_path(tmp_path, 1).read_text()
    assert "hello from" in text and "err line" in text and D.rank_log_path(tmp_path, 1).name == "log.rank1.txt"
    assert "hello" not in (tmp_path / "log.txt").read_text()


def test_rank0_keeps_the_launcher_log_and_links_it(tmp_path):
    with open(tmp_path / "log.txt", "ab") as launcher_log:
        assert _probe(tmp_path, 0, 2, launcher_log).returncode == 0
    link = D.rank_log_path(tmp_path, 0)
    assert link.is_symlink() and link.resolve() == (tmp_path / "log.txt").resolve()
    assert "hello from" in link.read_text() and "err line" in link.read_text()


def test_rank0_on_a_terminal_or_pipe_gets_its_own_file(tmp_path):
    out = _probe(tmp_path, 0, 2, subprocess.PIPE)
    assert out.returncode == 0 and b"hello" not in out.stdout
    assert not D.rank_log_path(tmp_path, 0).is_symlink()
    assert "hello from" in D.rank_log_path(tmp_path, 0).read_text()


def test_single_process_output_is_untouched(tmp_path):
    out = _probe(tmp_path, 0, 1, subprocess.PIPE)
    assert b"hello from None" in out.stdout and not list(tmp_path.glob("log.rank*"))


# ------------------------------------------------------------------------------------------------ rank sync


SYNC_PROBE = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from runner.launch.distributed import any_rank, finish_ranks
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    decisions = [any_rank(rank == 1), any_rank(False)]
    code = finish_ranks(6)
    open(os.path.join(sys.argv[1], f"sync.rank{rank}.json"), "w").write(json.dumps(
        {"decisions": decisions, "code": code, "initialized": dist.is_initialized()}))
""")


def test_any_rank_and_finish_ranks_with_two_real_ranks(tmp_path):
    """A stop requested on rank 1 only is seen by both ranks; after "stopped" (exit 6) rank 0 keeps its code and
    rank 1 exits 0 so torchrun does not tear rank 0 down; the process group is closed."""
    script = tmp_path / "probe.py"
    script.write_text(SYNC_PROBE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = {rank: json.loads((tmp_path / f"sync.rank{rank}.json").read_text()) for rank in (0, 1)}
    assert got[0]["decisions"] == got[1]["decisions"] == [True, False]
    assert (got[0]["code"], got[1]["code"]) == (6, 0)
    assert not got[0]["initialized"] and not got[1]["initialized"]


def test_sync_helpers_are_identity_without_a_process_group():
    assert D.any_rank(True) is True and D.any_rank(False) is False
    assert D.finish_ranks(6) == 6 and D.finish_ranks(5) == 5


@pytest.mark.parametrize("strategy,nproc,expected", [("fsdp", 2, True), ("zero3", 2, True), ("zero2", 2, False),
                                                    ("ddp", 2, False), ("fsdp", 1, False)])
def test_collective_save_only_when_weights_are_sharded(strategy, nproc, expected):
    spec = _spec(distribution=dict(nproc_per_node=nproc, strategy=strategy))
    assert D.needs_collective_save(spec) is expected
