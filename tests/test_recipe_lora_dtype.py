"""The runner's LoRA regime, read from the model its builder really returns (so the estimator, which counts
a 16-bit frozen base + fp32 adapters for bf16/fp16 LoRA runs, cannot drift from the runner silently)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/test_recipe.py

import warnings

import pytest

torch = pytest.importorskip("torch")

from runner.spec import DatasetSpec, DistributionSpec, PeftSettings, RunSpec  # noqa: E402


def _built(model_dir, precision: str, **kw):
    """The model ``recipe._build_lora`` returns for a run whose resolved precision is ``precision``."""
    from runner.train import recipe

    spec = RunSpec(model=str(model_dir), dataset=DatasetSpec(path="unused.jsonl"), method="lora",
                   precision=precision, **kw)
    r = recipe.Run(spec=spec, run_dir=model_dir)
    r.model_dir = model_dir
    r.tokenizer = recipe.load_tokenizer(model_dir)
    r.precision = precision  # as recipe._precision resolved it (tested in test_recipe_models.py)
    r.max_steps = 10  # AdaLoRA's schedule needs the step count
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return recipe._build_lora(r), r


def _dtypes(model) -> tuple[dict, dict]:
    """(frozen base dtypes, adapter dtypes) -> counts of parameters."""
    base, adapter = {}, {}
    for name, p in model.named_parameters():
        side = adapter if (".lora_" in name or ".ranknum" in name) else base
        side[(p.dtype, p.requires_grad)] = side.get((p.dtype, p.requires_grad), 0) + 1
    return base, adapter


@pytest.mark.parametrize("precision,half", [("bf16", "bfloat16"), ("fp16", "float16")])
@pytest.mark.parametrize("peft", [PeftSettings(), PeftSettings(use_dora=True, use_rslora=True),
                                  PeftSettings(variant="adalora", r=8, adalora_target_r=4)],
                         ids=["lora", "dora-rslora", "adalora"])
def test_16bit_run_has_16bit_frozen_base_and_fp32_adapters(tiny_model_dir, precision, half, peft):
    model, r = _built(tiny_model_dir, precision, peft=peft)
    base, adapter = _dtypes(model)
    assert set(base) == {(getattr(torch, half), False)}  # every base weight frozen, 2 B
    assert adapter and {dt for dt, _ in adapter} == {torch.float32}
    assert any(grad for _, grad in adapter)
    assert any("base loaded in" in n for n in r.notes)


def test_fp32_run_keeps_an_fp32_base(tiny_model_dir):
    model, _ = _built(tiny_model_dir, "fp32")
    base, adapter = _dtypes(model)
    assert set(base) == {(torch.float32, False)} and {dt for dt, _ in adapter} == {torch.float32}


def test_deepspeed_keeps_an_fp32_base_fsdp_a_16bit_one(tiny_model_dir):
    """DeepSpeed casts the module itself: the builder leaves it fp32. FSDP2 shards frozen parameters in their own
    dtype (tests/test_fsdp_memory.py runs it): the base stays 16-bit as on one process."""
    from runner.train import recipe

    fsdp = RunSpec(model=str(tiny_model_dir), dataset=DatasetSpec(path="unused.jsonl"), precision="bf16",
                   distribution=DistributionSpec(nproc_per_node=2, strategy="fsdp"))
    r = recipe.Run(spec=fsdp, run_dir=tiny_model_dir)
    r.precision = "bf16"
    assert recipe.lora_base_dtype(r) == torch.bfloat16
    for strategy in ("zero2", "zero3"):
        spec = RunSpec(model=str(tiny_model_dir), dataset=DatasetSpec(path="unused.jsonl"), precision="bf16",
                       distribution=DistributionSpec(nproc_per_node=2, strategy=strategy))
        r = recipe.Run(spec=spec, run_dir=tiny_model_dir)
        r.precision = "bf16"
        assert recipe.lora_base_dtype(r) == torch.float32
    ddp = RunSpec(model=str(tiny_model_dir), dataset=DatasetSpec(path="unused.jsonl"), precision="bf16",
                  distribution=DistributionSpec(nproc_per_node=2, strategy="ddp"))
    r = recipe.Run(spec=ddp, run_dir=tiny_model_dir)
    r.precision = "bf16"
    assert recipe.lora_base_dtype(r) == torch.bfloat16


def test_fp16_gradscaler_step_on_a_16bit_base(tiny_model_dir):
    """fp16 mixed precision as the Trainer runs it on a GPU (autocast fp16 + GradScaler): the scaler only
    unscales fp32 gradients (it refuses fp16 ones), so fp32 adapters on an fp16 base must train. The recipe
    trains fp16 runs in fp32 on a CPU, so the same step is driven by hand here with CPU autocast."""
    model, _ = _built(tiny_model_dir, "fp16")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
    scaler.unscale_(opt)  # raises "Attempting to unscale FP16 gradients." if an adapter were fp16
    assert all(torch.isfinite(p.grad).all() for p in trainable)
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, trainable))  # the step was not skipped
