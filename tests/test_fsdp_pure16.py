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
refusal is skipped. Everything else is the real path: the job manager -> spec.json and the engine configs ->
the runner's launch command (``python -m torch.distributed.run`` or ``accelerate launch``) -> worker -> recipe -> ``TrainingArguments(fsdp=...)`` -> Trainer -> accelerate's
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
from jobs_helpers import job_manager, sum_rows, write_jsonl
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


@pytest.mark.parametrize("master,expected", [("bf16", "no"), ("fp32", "bf16")])
def test_recipe_training_arguments_ignore_a_mixed_precision_env_for_pure_16bit(tmp_path, monkeypatch, master,
                                                                              expected):
    """An accelerate launch with some other config exports ACCELERATE_MIXED_PRECISION=bf16; TrainingArguments takes
    it when bf16/fp16 are off. The recipe's pure 16-bit arguments keep mixed precision off anyway (one process here:
    the FSDP overrides need a process group, the real run above covers them)."""
    from runner.train.recipe import Run, training_arguments

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    spec = RunSpec(model="x", method="full", precision="bf16", master_dtype=master,
                   dataset=DatasetSpec(path="d.jsonl"), device="cpu")
    run = Run(spec=spec, run_dir=tmp_path, precision="bf16", device="cpu", max_steps=1)
    args = training_arguments(run)
    assert args.mixed_precision == expected and args.bf16 == (master == "fp32")
    assert any("ACCELERATE_MIXED_PRECISION" in n for n in run.notes) == (master == "bf16")


# ------------------------------------------------------------------------------------------------ a real run

#: Installed as ``sitecustomize`` in the ranks (torchrun sets RANK) when the test asks. (1) accelerate's
#: AcceleratorState takes the Trainer's FSDP plugin on MULTI_CPU exactly as its MULTI_GPU branch does (the same
#: statements), and the runner's CPU refusal of strategy fsdp is skipped: the only two changes to the path.
#: (2) A Trainer callback records, after every optimizer step and before the gradients are zeroed, each rank's local
#: dtypes and element counts of parameters, gradients and AdamW states, and whether the model is an FSDP2 module.
FSDP_ON_CPU_HOOK = '''
import os
if os.environ.get("FTADVISOR_TEST_FSDP_ON_CPU") and "RANK" in os.environ:
    import json
    from pathlib import Path

    import accelerate.state as _state
    from accelerate.utils import DistributedType

    _original_init = _state.AcceleratorState.__init__

    def _init(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin
            _state.PartialState._shared_state["distributed_type"] = self.distributed_type  # as the original ends

    _state.AcceleratorState.__init__ = _init

    import runner.launch.distributed as _dist
    import runner.train.recipe as _recipe
    from transformers import TrainerCallback

    _dist.check_strategy = lambda spec: None

    def _local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    class _Dtypes(TrainerCallback):
        def __init__(self, run_dir):
            self.path = Path(run_dir, "dtypes.rank" + os.environ["RANK"] + ".jsonl")

        def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            from torch.distributed.fsdp import FSDPModule

            opt = getattr(optimizer, "optimizer", optimizer)
            params = list(model.parameters())
            row = {
                "step": state.global_step + 1,
                "fsdp_module": isinstance(model, FSDPModule),
                "dtensor": all(hasattr(p, "to_local") for p in params),
                "weights": sorted({str(_local(p).dtype) for p in params}),
                "grads": sorted({str(_local(p.grad).dtype) for p in params if p.grad is not None}),
                "grad_count": sum(p.grad is not None for p in params),
                "optimizer": sorted({k + ":" + str(_local(v).dtype) for s in opt.state.values()
                                     for k, v in s.items() if k != "step" and hasattr(v, "dtype")}),
                "local_numel": sum(_local(p).numel() for p in params),
                "global_numel": sum(p.numel() for p in params),
                "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION"),
            }
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\\n")

    _original_build_trainer = _recipe._build_trainer

    def _build_trainer(r):
        trainer = _original_build_trainer(r)
        trainer.add_callback(_Dtypes(r.run_dir))
        return trainer

    _recipe._build_trainer = _build_trainer
    _recipe._cpu_has_bf16 = lambda: True  # bf16 runs on any x86 CPU (slowly without AVX512-BF16)
'''

STEPS = 2


def fsdp_on_cpu(tmp_path: Path, monkeypatch, hook_text: str = FSDP_ON_CPU_HOOK) -> Path:
    """Install ``hook_text`` as the ranks' ``sitecustomize`` (the env var turns it on), clear accelerate's env, one
    thread per rank; returns a small training set (``sum_rows``) for the run."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(hook_text, encoding="utf-8")
    for name in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("FTADVISOR_TEST_FSDP_ON_CPU", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("FTADVISOR_WORKER_CMD", raising=False)
    return write_jsonl(tmp_path / "train.jsonl", sum_rows(16))


def _run_fsdp_on_cpu(tmp_path: Path, monkeypatch, model_dir: Path, launcher: str, master: str) -> Path:
    """spec -> the job manager (engine configs, the runner's launch command: torchrun or accelerate launch) -> two
    ranks with the hook; returns the run folder of the completed run."""
    data = fsdp_on_cpu(tmp_path, monkeypatch)
    spec = RunSpec(name="fsdp-pure-bf16", model=str(model_dir), method="full", precision="bf16",
                   master_dtype=master, dataset=DatasetSpec(path=str(data), eval_fraction=0.0), max_steps=STEPS,
                   save_steps=STEPS, micro_batch_size=2, seq_len=32, device="cpu", learning_rate=1e-3,
                   distribution=DistributionSpec(nproc_per_node=2, strategy="fsdp", launcher=launcher))
    run_dir = run_to_completion(tmp_path, spec)
    acc = yaml.safe_load((run_dir / D.ACCELERATE_CONFIG).read_text())
    assert acc["distributed_type"] == "FSDP" and acc["mixed_precision"] == ("no" if master != "fp32" else "bf16")
    return run_dir


def run_to_completion(tmp_path: Path, spec: RunSpec) -> Path:
    """Launch ``spec`` through a job manager under ``tmp_path`` and wait; the run folder of the completed run (the
    log tails, rank 1's included, when it did not complete)."""
    with job_manager(tmp_path / "runs") as manager:
        rec = manager.launch(spec)
        done = manager.wait(rec.id, timeout_s=500)
        run_dir = Path(done.output_dir)
        rank1 = run_dir / "log.rank1.txt"
        assert done.status == "completed", (done.reason, manager.log_tail(rec.id, 80),
                                            rank1.read_text()[-3000:] if rank1.is_file() else "")
    return run_dir


def _rows(run_dir: Path) -> dict[int, list[dict]]:
    return {rank: [json.loads(line) for line in (run_dir / f"dtypes.rank{rank}.jsonl").read_text().splitlines()]
            for rank in (0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_rank_fsdp_run_trains_in_pure_bf16(tmp_path, monkeypatch, tiny_model_dir, launcher):
    """A real two-rank FSDP2 run of the worker: every step, on both ranks, the local parameter shards, their
    gradients and AdamW's exp_avg / exp_avg_sq are bf16 (no fp32 master copy), the model is an FSDP2 module
    whose DTensor shards hold half of the elements, and the saved model (read by safetensors' own reader) is
    bf16 with the trained values."""
    from safetensors import safe_open

    run_dir = _run_fsdp_on_cpu(tmp_path, monkeypatch, tiny_model_dir, launcher, "bf16")
    rows = _rows(run_dir)
    for rank, steps in rows.items():
        assert [s["step"] for s in steps] == list(range(1, STEPS + 1)), (rank, steps)
        for s in steps:
            assert s["fsdp_module"] and s["dtensor"], s  # FSDP2 sharded it (DDP would leave plain tensors)
            assert s["weights"] == ["torch.bfloat16"], s
            assert s["grads"] == ["torch.bfloat16"] and s["grad_count"] > 0, s
            assert s["optimizer"] == ["exp_avg:torch.bfloat16", "exp_avg_sq:torch.bfloat16"], s
            # two ranks: each holds about half of every parameter (FSDP2 pads dim 0 to a multiple of 2)
            assert s["local_numel"] < 0.6 * s["global_numel"], s
    assert rows[0][0]["global_numel"] == rows[1][0]["global_numel"]
    assert rows[0][0]["local_numel"] + rows[1][0]["local_numel"] >= rows[0][0]["global_numel"]
    if launcher == "accelerate":  # the config the runner wrote reached the ranks as "no mixed precision"
        assert {s["mixed_precision"] for s in rows[0]} == {"no"}
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed", result
    report = json.loads((run_dir / "report.json").read_text())
    assert report["precision"] == "bf16" and report["steps"] == STEPS
    assert any("pure bf16" in n for n in report["notes"]), report["notes"]
    with safe_open(run_dir / "model" / "model.safetensors", "pt") as saved, \
            safe_open(Path(tiny_model_dir) / "model.safetensors", "pt") as base:
        dtypes = {saved.get_slice(k).get_dtype() for k in saved.keys()}
        assert dtypes == {"BF16"}, dtypes
        name = next(k for k in saved.keys() if k.endswith("q_proj.weight"))
        assert not saved.get_tensor(name).float().equal(base.get_tensor(name).float())  # it trained


@pytest.mark.slow
def test_two_rank_fsdp_run_with_fp32_master_upcasts(tmp_path, monkeypatch, tiny_model_dir):
    """The contrast, same hook and path: master_dtype fp32 (mixed precision bf16) -> accelerate upcasts the
    trainable shards to fp32, so gradients and AdamW states are fp32. Shows the pure run's bf16 is the spec's doing."""
    run_dir = _run_fsdp_on_cpu(tmp_path, monkeypatch, tiny_model_dir, "torchrun", "fp32")
    for steps in _rows(run_dir).values():
        for s in steps:
            assert s["fsdp_module"] and s["weights"] == ["torch.float32"] and s["grads"] == ["torch.float32"], s
            assert s["optimizer"] == ["exp_avg:torch.float32", "exp_avg_sq:torch.float32"], s
