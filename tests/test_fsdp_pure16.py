"""Pure 16-bit full fine-tuning under FSDP (issue 10): the spec accepts it, the engines launch it without mixed
precision, and a real two-rank FSDP2 run through the runner's worker keeps weights, gradients and AdamW states in
bf16.

Why FSDP can be pure 16-bit and DeepSpeed cannot: accelerate's ``fsdp2_prepare_model`` upcasts trainable
parameters to fp32 only when ``mixed_precision != "no"``; FSDP then shards the model as loaded. DeepSpeed's bf16 /
fp16 optimizer always keeps an fp32 master copy in its optimizer state.

The real run: accelerate 1.x applies an FSDP plugin only on GPU-like distributed types (``AcceleratorState``: the
FSDP switch sits under MULTI_GPU/XPU/NPU...), so on CPU the runner refuses strategy fsdp
(``runner.launch.distributed.check_strategy``) instead of silently training DDP. FSDP2 itself runs on CPU with gloo
(``tests/test_fsdp_memory.py``), so the test installs a ``sitecustomize`` in the ranks that lifts exactly that gate:
``AcceleratorState`` takes the Trainer's FSDP plugin on MULTI_CPU as it does on MULTI_GPU, and the runner's CPU
refusal is skipped. Everything else is the real path: spec.json -> ``python -m torch.distributed.run`` (the
runner's launch command) -> worker -> recipe -> ``TrainingArguments(fsdp=...)`` -> Trainer -> accelerate's
``fsdp2_prepare_model`` -> ``fully_shard`` -> AdamW steps -> the FSDP state-dict save.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftcore.paths import REPO_ROOT
from jobs_helpers import sum_rows, write_jsonl
from runner.launch import distributed as D
from runner.spec import DatasetSpec, DistributionSpec, RunSpec


def _spec(**kw) -> RunSpec:
    dist = kw.pop("distribution", {})
    return RunSpec(model=kw.pop("model", "smollm2-135m"), dataset=kw.pop("dataset", DatasetSpec(path="train.jsonl")),
                   distribution=DistributionSpec(**dist), **kw)


# ------------------------------------------------------------------------------------------------ spec


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_spec_accepts_pure_16bit_with_fsdp(dtype):
    spec = _spec(method="full", precision=dtype, master_dtype=dtype,
                 distribution=dict(nproc_per_node=4, strategy="fsdp"))
    assert spec.master_dtype == dtype and spec.distribution.strategy == "fsdp"
    assert D.pure_16bit(spec)


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_spec_refuses_pure_16bit_with_deepspeed_and_says_why(strategy):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        _spec(method="full", precision="bf16", master_dtype="bf16",
              distribution=dict(nproc_per_node=2, strategy=strategy))
    text = str(err.value)
    assert "master_dtype" in text and "DeepSpeed keeps an fp32 master copy" in text and strategy in text
    assert "fsdp" in text  # the fix names the strategy that can run it
    # One process with a ZeRO strategy is no DeepSpeed run at all: accepted.
    assert _spec(method="full", precision="bf16", master_dtype="bf16",
                 distribution=dict(strategy=strategy)).master_dtype == "bf16"


def test_spec_pure_16bit_other_rules_unchanged():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs precision bf16"):
        _spec(method="full", precision="fp16", master_dtype="bf16", distribution=dict(nproc_per_node=2,
                                                                                     strategy="fsdp"))
    with pytest.raises(ValidationError, match="applies to full fine-tuning"):
        _spec(method="lora", precision="bf16", master_dtype="bf16", distribution=dict(nproc_per_node=2,
                                                                                     strategy="fsdp"))


# ------------------------------------------------------------------------------------------------ engine configs


@pytest.mark.parametrize("master,expected", [("bf16", "no"), ("fp32", "bf16")])
def test_accelerate_config_turns_mixed_precision_off_for_pure_16bit(tmp_path, tiny_model_dir, master, expected):
    """Read back by accelerate's own config loader, and through the env ``accelerate launch`` derives from it
    into ``TrainingArguments`` built the way the recipe builds them (bf16/fp16 flags off for pure 16-bit)."""
    from accelerate.commands.config.config_args import load_config_from_file

    spec = _spec(model=str(tiny_model_dir), method="full", precision="bf16", master_dtype=master,
                 distribution=dict(nproc_per_node=2, strategy="fsdp", launcher="accelerate"))
    D.write_engine_configs(spec, tmp_path)
    cfg = load_config_from_file(str(tmp_path / D.ACCELERATE_CONFIG))
    assert cfg.distributed_type.value == "FSDP" and cfg.mixed_precision == expected
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert D.mixed_precision(spec) == expected


@pytest.mark.parametrize("master,expected", [("bf16", "no"), ("fp32", "bf16")])
def test_accelerate_launch_env_reaches_the_trainer(tmp_path, tiny_model_dir, master, expected):
    """What ``accelerate launch --config_file`` exports to the ranks, and what ``TrainingArguments`` makes of it.

    accelerate's launcher (``prepare_multi_gpu_env``) sets ACCELERATE_MIXED_PRECISION from the config; with
    bf16=False (the recipe's flags for pure 16-bit), TrainingArguments takes that env value as its
    ``mixed_precision``, the one the Trainer hands the Accelerator, so a "bf16" config would bring autocast and
    FSDP's fp32 upcast back. accelerate's own parser and env builder, then TrainingArguments, in a child process."""
    spec = _spec(model=str(tiny_model_dir), method="full", precision="bf16", master_dtype=master, device="cpu",
                 distribution=dict(nproc_per_node=2, strategy="fsdp", launcher="accelerate"))
    D.write_engine_configs(spec, tmp_path)
    probe = (
        "import json, os, sys, tempfile\n"
        "from accelerate.commands.launch import launch_command_parser, _validate_launch_command\n"
        "from accelerate.utils.launch import prepare_multi_gpu_env\n"
        "args = launch_command_parser().parse_args(sys.argv[1:])\n"
        "args, defaults, mp = _validate_launch_command(args)\n"
        "env = prepare_multi_gpu_env(args)\n"
        "os.environ['ACCELERATE_MIXED_PRECISION'] = env['ACCELERATE_MIXED_PRECISION']\n"
        "from transformers import TrainingArguments\n"
        "ta = TrainingArguments(output_dir=tempfile.mkdtemp(), bf16=sys.argv[-1] == 'fp32', use_cpu=True,\n"
        "                       report_to='none')\n"
        "print(json.dumps({'env_mp': env['ACCELERATE_MIXED_PRECISION'], 'fsdp': env.get('ACCELERATE_USE_FSDP'),\n"
        "                  'trainer_mp': ta.mixed_precision}))\n"
    )
    cmd = D.launch_command(spec, tmp_path)
    launch_args = cmd[cmd.index("--config_file"):]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    out = subprocess.run([sys.executable, "-c", probe, *launch_args, master], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"env_mp": expected, "fsdp": "true", "trainer_mp": expected}
