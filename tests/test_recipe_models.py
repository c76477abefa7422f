"""Model folders, precision choice and failure classification of the recipe (no long training)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see runner/train/worker.py

import json
import math
import shutil

import pytest

from runner import exitcodes
from runner.train import recipe
from runner.errors import RunnerError
from runner.models import DEMO_MODEL_ID, resolve_model_dir
from runner.spec import DatasetSpec, PeftSettings, RunSpec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    path = tmp_path_factory.mktemp("mds") / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} plus 2?", "completion": f" {i + 2}"}) + "\n"
                            for i in range(24)), encoding="utf-8")
    return path


def _spec(model_dir, dataset, **kw):
    fields = dict(model=str(model_dir), dataset=DatasetSpec(path=str(dataset), eval_fraction=0.25), max_steps=2,
                  micro_batch_size=4, seq_len=32, save_steps=100, peft=PeftSettings(r=2))
    fields.update(kw)
    return RunSpec(**fields)


def test_local_folder_checks(tiny_model_dir, tmp_path):
    assert resolve_model_dir(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert resolve_model_dir(str(tiny_model_dir / "config.json")) == tiny_model_dir.resolve()
    no_tok = tmp_path / "no_tok"
    shutil.copytree(tiny_model_dir, no_tok)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    with pytest.raises(RunnerError, match="tokenizer") as err:
        resolve_model_dir(str(no_tok))
    assert err.value.exit_code == exitcodes.BAD_SPEC and err.value.fix
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(RunnerError, match="only pickled .bin weights"):
        resolve_model_dir(str(pickled))


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunnerError, match="offline") as err:
        resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert err.value.field == "model"
    with pytest.raises(RunnerError, match="model folder './no/such/folder' does not exist"):
        resolve_model_dir("./no/such/folder")


def test_precision_choice(monkeypatch):
    notes = []
    spec = RunSpec(model="m", dataset=DatasetSpec(path="d.jsonl"), precision="bf16")
    monkeypatch.setattr(recipe, "_cpu_has_bf16", lambda: False)
    assert recipe._precision(spec, "cpu", notes) == "fp32" and "no native bf16" in notes[-1]
    monkeypatch.setattr(recipe, "_cpu_has_bf16", lambda: True)
    assert recipe._precision(spec, "cpu", notes) == "bf16"
    assert recipe._precision(spec.model_copy(update={"precision": "fp16"}), "cpu", notes) == "fp32"


def test_default_bf16_run_reports_what_it_used(tiny_model_dir, dataset, tmp_path):
    r = recipe.run(_spec(tiny_model_dir, dataset, precision="bf16"), tmp_path / "run")
    rep = json.loads((tmp_path / "run" / "report.json").read_text())
    expected = "bf16" if recipe._cpu_has_bf16() else "fp32"
    assert rep["precision"] == expected and r.trainer.args.bf16 == (expected == "bf16")
    assert math.isfinite(rep["final_loss"])


def test_packing_trains(tiny_model_dir, dataset, tmp_path):
    spec = _spec(tiny_model_dir, dataset, precision="fp32")
    spec.dataset.packing = True
    r = recipe.run(spec, tmp_path / "run")
    batch = next(iter(r.trainer.get_train_dataloader()))
    assert "position_ids" in batch and "attention_mask" not in batch
    assert (batch["position_ids"][0] == 0).sum() > 1  # several examples share the first row
    assert math.isfinite(json.loads((tmp_path / "run" / "report.json").read_text())["final_loss"])


@pytest.mark.parametrize("phase", ["load", "step", "eval"])
def test_out_of_memory_is_classified_by_phase(tiny_model_dir, dataset, tmp_path, monkeypatch, phase):
    import torch
    import transformers

    def boom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    if phase == "load":
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    elif phase == "step":
        monkeypatch.setattr(transformers.Trainer, "train", boom)
    else:
        monkeypatch.setattr(transformers.Trainer, "evaluate", boom)
    with pytest.raises(RunnerError) as err:
        recipe.run(_spec(tiny_model_dir, dataset, precision="fp32"), tmp_path / "run")
    assert err.value.kind == f"oom_{phase}" and err.value.exit_code == exitcodes.OUT_OF_MEMORY
    assert "out of memory" in str(err.value) and err.value.fix


def test_unknown_target_names_are_a_spec_error(tiny_model_dir, dataset, tmp_path):
    with pytest.raises(RunnerError, match="target|match") as err:
        recipe.run(_spec(tiny_model_dir, dataset, peft=PeftSettings(target_modules=["nope_proj"])), tmp_path / "r")
    assert err.value.exit_code == exitcodes.BAD_SPEC


@pytest.mark.slow
def test_demo_model_converts_once():
    """The GGUF demo model becomes a safetensors folder that loads as a plain Llama (134,515,008 params,
    REFERENCE.md "Offline assets")."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(DEMO_MODEL_ID)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert resolve_model_dir(DEMO_MODEL_ID) == folder  # second call reuses the folder
