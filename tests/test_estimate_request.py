"""The one RunSpec -> EstimateRequest mapping (runner/estimate_request.py): every field of both models is placed,
each mapped field reaches the request, and the figures follow what the run really does.

Expected values are the spec's own values (a hand-written spec with every knob off its default) and the runner's
behaviour read from its code: one process runs no engine (so no sharding, no offload), the eval forward runs at
the training micro-batch (runner/train/recipe.py per_device_eval_batch_size=spec.micro_batch_size), rows longer than
seq_len are truncated.
"""

from __future__ import annotations

import pytest

from estimator.request import EstimateRequest
from runner import estimate_request as M
from runner.errors import RunnerError
from runner.spec import DistributionSpec, PeftSettings, RunSpec


def _spec(**kw) -> RunSpec:
    return RunSpec.model_validate({"model": "smollm2-135m", "dataset": {"path": "train.jsonl"}, **kw})


# ------------------------------------------------------------------------------------------------ the walk
def test_every_request_field_is_mapped_or_named_as_not_from_the_spec():
    fields = set(EstimateRequest.model_fields)
    mapped, named = set(M.FROM_SPEC), set(M.NOT_FROM_SPEC)
    assert not mapped & named, mapped & named
    missing = fields - mapped - named
    assert not missing, (f"EstimateRequest fields neither mapped from the RunSpec (FROM_SPEC) nor named as not "
                         f"coming from it (NOT_FROM_SPEC): {sorted(missing)}")
    stale = (mapped | named) - fields
    assert not stale, f"entries for fields EstimateRequest no longer has: {sorted(stale)}"


def _top(path: str) -> str:
    return path.split(".")[0]


def test_every_spec_field_is_read_or_named_as_not_estimated():
    paths = {path for path, _ in M.FROM_SPEC.values()}
    tops = {_top(p) for p in paths}
    for name in RunSpec.model_fields:
        if name in ("peft", "distribution"):
            continue
        assert (name in tops) != (name in M.SPEC_NOT_ESTIMATED), (
            f"RunSpec.{name}: read by FROM_SPEC and named in SPEC_NOT_ESTIMATED, or neither")
    for model, prefix, skipped in ((PeftSettings, "peft", M.PEFT_NOT_ESTIMATED),
                                   (DistributionSpec, "distribution", M.DISTRIBUTION_NOT_ESTIMATED)):
        for name in model.model_fields:
            assert (f"{prefix}.{name}" in paths) != (name in skipped), (
                f"RunSpec.{prefix}.{name}: read by FROM_SPEC and named as not estimated, or neither")
    assert not set(M.SPEC_NOT_ESTIMATED) - set(RunSpec.model_fields)


def test_the_mapping_takes_only_the_inputs_the_spec_lacks():
    import inspect

    params = set(inspect.signature(M.estimate_request).parameters) - {"spec"}
    # tokens comes from spec.max_steps; generate_batch_size / max_new_tokens are the runner's constants
    assert params == set(M.NOT_FROM_SPEC) - {"tokens", "generate_batch_size", "max_new_tokens"}


# ------------------------------------------------------------------------------------------------ the values
def test_each_mapped_field_reaches_the_request():
    spec = _spec(
        method="lora", optimizer="adamw-8bit", epochs=2.5, micro_batch_size=3, gradient_accumulation_steps=7,
        seq_len=384, gradient_checkpointing=True, precision="fp16", attention="eager",
        peft=dict(variant="adalora", r=12, alpha=20.0, dropout=0.1, target_modules=["q_proj", "k_proj"],
                  use_rslora=True, use_dora=True),
        distribution=dict(nproc_per_node=4, nnodes=2, strategy="zero3", offload=True),
    )
    req = M.estimate_request(spec, gpu="v100-32gb", mfu=0.3, price=1.5, examples=1000, tokens_per_example=200)
    assert (req.model, req.method, req.rank, req.alpha, req.targets) == (
        "smollm2-135m", "lora", 12, 20.0, ["q_proj", "k_proj"])
    assert (req.dora, req.rslora, req.adalora, req.dropout) == (True, True, True, 0.1)
    assert (req.dtype, req.optimizer, req.batch_size, req.seq_len) == ("fp16", "adamw-8bit", 3, 384)
    assert (req.grad_checkpointing, req.grad_accum_steps, req.attention, req.epochs) == (True, 7, "eager", 2.5)
    assert (req.num_gpus, req.sharding, req.offload) == (8, "zero3", True)  # 4 per node x 2 nodes
    assert (req.gpu, req.mfu, req.price, req.examples, req.tokens_per_example) == ("v100-32gb", 0.3, 1.5, 1000, 200)
    assert req.tokens is None
    if "eval_batch_size" in EstimateRequest.model_fields:
        assert req.eval_batch_size == 3


def test_one_process_runs_no_engine():
    # DistributionSpec's defaults say ddp; one process in total is a plain single-GPU run (no offload either).
    req = M.estimate_request(_spec(distribution=dict(strategy="zero3", offload=True)), gpu="a100-80gb")
    assert (req.num_gpus, req.sharding, req.offload) == (1, "none", False)


def test_rows_longer_than_seq_len_are_truncated():
    req = M.estimate_request(_spec(seq_len=256), gpu="a100-80gb", examples=10, tokens_per_example=1000)
    assert req.tokens_per_example == 256


def test_max_steps_caps_the_tokens():
    # 10 steps x (2 micro x 4 accumulation x 2 ranks) sequences x 100 tokens (a typical row shorter than seq_len)
    spec = _spec(max_steps=10, micro_batch_size=2, gradient_accumulation_steps=4, seq_len=512,
                 distribution=dict(nproc_per_node=2))
    assert M.estimate_request(spec, gpu="a100-80gb", examples=5, tokens_per_example=100).tokens == 10 * 16 * 100
    packed = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"packing": True})})
    assert M.estimate_request(packed, gpu="a100-80gb").tokens == 10 * 16 * 512  # packing fills each sequence


def test_a_value_the_estimator_refuses_names_the_spec_field():
    # The runner takes only presets or lists (runner/train/recipe.py resolve_targets); a bare module name is refused.
    with pytest.raises(RunnerError) as info:
        M.estimate_request(_spec(peft=dict(target_modules="q_proj")), gpu="a100-80gb")
    assert info.value.field == "peft.target_modules" and "peft.target_modules" in str(info.value)


def test_gradient_accumulation_reaches_the_figure():
    """The issue's miss: accumulation keeps the gradients allocated through the next micro-steps, so the run with
    accumulation 4 needs more than the one estimated without it (the estimator's grad_accum_steps field)."""
    from estimator import estimate

    one = estimate(M.estimate_request(_spec(gradient_accumulation_steps=1), gpu="a100-80gb"))
    four = estimate(M.estimate_request(_spec(gradient_accumulation_steps=4), gpu="a100-80gb"))
    assert four.request.grad_accum_steps == 4
    assert four.memory.peak_bytes > one.memory.peak_bytes


def test_pure_bf16_under_fsdp_maps_to_the_estimators_pure_fsdp_regime():
    """Issue 10: a pure bf16 full fine-tune sharded with FSDP reaches the estimator as master_dtype bf16 + sharding
    fsdp (the regime tests/test_fsdp_memory.py checks against a real FSDP2 step): its gradient and AdamW shards
    are half the fp32-master run's."""
    from estimator import estimate

    kw = dict(method="full", precision="bf16", distribution=dict(nproc_per_node=4, strategy="fsdp"))
    pure = M.estimate_request(_spec(master_dtype="bf16", **kw), gpu="a100-80gb")
    assert (pure.master_dtype, pure.sharding, pure.num_gpus, pure.dtype) == ("bf16", "fsdp", 4, "bf16")
    mixed = M.estimate_request(_spec(master_dtype="fp32", **kw), gpu="a100-80gb")
    p, m = estimate(pure).memory, estimate(mixed).memory
    # fp32 master: 4 B weights, 4 B gradients, 8 B AdamW per parameter; pure bf16: 2 + 2 + 4 (torch AdamW's
    # moments are zeros_like(p)) -> half each
    assert 2 * p.gradients_bytes == m.gradients_bytes and 2 * p.optimizer_bytes == m.optimizer_bytes
