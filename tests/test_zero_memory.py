"""DeepSpeed ZeRO-2/3 per-GPU model states against DeepSpeed's own estimator functions.

``DS_FIGURES`` were computed by DeepSpeed 0.19.8's ``estimate_zero2_model_states_mem_needs`` (stage_1_and_2.py:
``2P + 18P/N``) and ``estimate_zero3_model_states_mem_needs`` (stage3.py: ``4 x largest module + 18P/N``), no
offload, on 2026-12-02 (``pip install deepspeed==0.19.8`` with ``DS_BUILD_OPS=0`` into a scratch folder, never a
project dependency). Their inputs: total parameters (tied weights once) and the largest module's own parameters
(DeepSpeed's ``model_to_params``), counted on our meta model of each catalog entry.

DeepSpeed's "18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optimizer states" counts the fp32 gradient for the whole
partition. DeepSpeed's optimizer wrappers make it one group at a time (``single_grad_partition`` in
``stage_1_and_2.py`` ``step``; ``_prepare_fp32_grad_for_sub_group`` / ``_release_sub_group`` in ``stage3.py``):
when the largest group stepped at once is the whole partition (these models under ZeRO-2, the small ones under
ZeRO-3) our states + that fp32 gradient must equal DeepSpeed's figure; when ZeRO-3's ``sub_group_size`` (1e9
values) cuts the partition (Llama-2-13B on 2 GPUs: 6.5e9 values per GPU) ours is lower by exactly 4 B per value
left out of the largest sub-group. DeepSpeed's ZeRO-3 function also counts 18, not the 20 its stage3.py holds
(a 16-bit parameter *and* a 16-bit gradient partition): ours is 2P/N above it for that reason.
"""

from __future__ import annotations

import warnings

import pytest

from estimator.catalog import resolve_model
from estimator.inventory import build_inventory
from estimator.memory import (DS_FP32_BYTES, DS_GRAD16_BYTES, DS_PARAM_PERSISTENCE_THRESHOLD, DS_REDUCE_BUCKET_SIZE,
                              DS_SUB_GROUP_SIZE, step_memory, trainer_param_groups, zero_step_values)
from estimator.request import EstimateRequest

# (model, GPUs): (total params, largest module params, ZeRO-2 GPU bytes, ZeRO-3 GPU bytes, ZeRO-3 largest layer
# bytes): DeepSpeed 0.19.8's functions (see the module docstring), 2026-12-02.
DS_FIGURES = {
    ("smollm2-135m", 2): (134515008, 28311552, 1479665088, 1323881280, 113246208),
    ("qwen2.5-0.5b", 8): (494032768, 136134656, 2099639264, 1656112352, 544538624),
    ("llama-2-7b", 4): (6738415616, 131072000, 43799701504, 30847158272, 524288000),
    ("llama-2-13b", 2): (13015864320, 163840000, 143174507520, 117798138880, 655360000),
}


def _inventory(model_id: str, sharding: str, num_gpus: int):
    req = EstimateRequest(model=model_id, method="full", sharding=sharding, num_gpus=num_gpus)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inv, _, _ = build_inventory(resolve_model(model_id), req)
    return inv


def _states(inv, sharding: str, num_gpus: int):
    """Step memory with no activations: only what DeepSpeed's model-state estimators count (and more)."""
    return step_memory(inv, method="full", optimizer="adamw", sharding=sharding, num_gpus=num_gpus, offload=False,
                       activations_bytes=0, forward_peak_rel=0, backward_peak_rel=0)


def _no_decay_per_gpu(inv, num_gpus: int) -> int:
    return sum(t.numel for t in trainer_param_groups(inv)[1]) // num_gpus


@pytest.mark.parametrize(("model_id", "num_gpus"), list(DS_FIGURES))
def test_zero2_states_are_deepspeeds_estimate(model_id, num_gpus):
    total, _, ds_z2, _, _ = DS_FIGURES[(model_id, num_gpus)]
    inv = _inventory(model_id, "zero2", num_gpus)
    assert sum({t.name: t.numel for t in inv.tensors}.values()) == total  # same P as DeepSpeed was given
    mem = _states(inv, "zero2", num_gpus)
    fp32_grad = DS_FP32_BYTES * zero_step_values(inv, "zero2", num_gpus)
    ours = mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes + fp32_grad
    # left out of our fp32 gradient: the no-decay group (norms, biases: stepped after the decay group);
    # added: buffers (rotary inv_freq) and the padding of each flat partition to a multiple of N
    gap = DS_FP32_BYTES * _no_decay_per_gpu(inv, num_gpus)
    assert abs(ours + gap - inv.buffer_bytes - ds_z2) <= 64 * num_gpus, (ours, ds_z2)
    # the step's peak adds AdamW's sqrt temporary of that group, which DeepSpeed's estimator does not count
    assert mem.phase_peaks["optimizer step"] == ours + 4 * zero_step_values(inv, "zero2", num_gpus)


@pytest.mark.parametrize(("model_id", "num_gpus"), list(DS_FIGURES))
def test_zero3_states_are_deepspeeds_estimate_up_to_the_sub_group(model_id, num_gpus):
    total, _, _, ds_z3, ds_largest = DS_FIGURES[(model_id, num_gpus)]
    inv = _inventory(model_id, "zero3", num_gpus)
    mem = _states(inv, "zero3", num_gpus)
    step_values = zero_step_values(inv, "zero3", num_gpus)
    ours = (mem.weights_bytes + mem.gradients_bytes + mem.optimizer_bytes + DS_FP32_BYTES * step_values
            - inv.buffer_bytes)
    persistent = DS_GRAD16_BYTES * sum(t.numel for t in inv.tensors if t.numel <= DS_PARAM_PERSISTENCE_THRESHOLD)
    # DeepSpeed's 18P/N (its figure less its 4 x largest module) against our sharded states: the fp32 gradient
    # of the whole partition less the largest sub-group's, the persistent parameters' whole copies, and 2P/N
    # that its ZeRO-3 "18" leaves out: stage3.py holds both a 16-bit parameter partition (``lp_param_buffer``)
    # and a 16-bit gradient partition (``grad_partitions_flat_buffer``), 2 + 2 + 4 + 8 (+ 4 at the step)
    decay_per_gpu = total // num_gpus - _no_decay_per_gpu(inv, num_gpus)
    left_out = DS_FP32_BYTES * (total // num_gpus - step_values)
    second_16bit_partition = DS_GRAD16_BYTES * total // num_gpus
    assert abs((ours - persistent) + left_out - second_16bit_partition - (ds_z3 - ds_largest)) \
        <= 64 * len(inv.tensors), (ours, ds_z3)
    if decay_per_gpu <= DS_SUB_GROUP_SIZE:
        assert step_values == pytest.approx(decay_per_gpu, abs=len(inv.tensors))
    else:  # Llama-2-7B on 4, 13B on 2 GPUs: 1.7e9 / 6.5e9 values per GPU, sub-groups of 1e9 (+ one parameter)
        largest_part = max(-(-t.numel // num_gpus) for t in inv.tensors)
        assert DS_SUB_GROUP_SIZE <= step_values < DS_SUB_GROUP_SIZE + largest_part



def test_llama2_13b_zero3_on_two_a100s_is_deepspeeds_model_states_not_160_gib():
    """Issue 10's case: full fine-tuning, fp32 master, ZeRO-3 on 2 x A100-80GB. DeepSpeed's estimator says
    117.8e9 B (109.7 GiB) of model states per GPU; the allocated step peak we model is its states with the
    fp32 gradient and AdamW's temporary of one sub-group only, plus ZeRO-3's resident reduce bucket."""
    inv = _inventory("llama-2-13b", "zero3", 2)
    mem = _states(inv, "zero3", 2)
    step = mem.phase_peaks["optimizer step"]
    assert mem.overhead_bytes == DS_REDUCE_BUCKET_SIZE * DS_GRAD16_BYTES  # one bucket, kept from init on
    assert step < DS_FIGURES[("llama-2-13b", 2)][3]
    assert 100 * 2**30 < step < 110 * 2**30, step / 2**30


def test_zero2_reduce_buckets_live_through_backward_only():
    """contiguous_gradients + overlap_comm (the runner's ds_config.json): two reduce buckets of 5e8 16-bit values
    while gradients are reduced (``setup_buckets``), freed by the epilogue before the step."""
    inv = _inventory("smollm2-135m", "zero2", 2)
    mem = _states(inv, "zero2", 2)
    buckets = 2 * DS_REDUCE_BUCKET_SIZE * DS_GRAD16_BYTES
    assert mem.phase_peaks["backward"] - mem.phase_peaks["forward/loss end"] == buckets
    assert mem.overhead_bytes == 0


def test_zero3_keeps_gradient_partition_through_forward():
    """ZeRO-3 allocates its 16-bit gradient partition buffer at init (``grad_partitions_flat_buffer``): the
    forward already holds it; ZeRO-2 gets its partition at the first reduction."""
    inv = _inventory("smollm2-135m", "zero3", 2)
    mem = _states(inv, "zero3", 2)
    assert mem.phase_peaks["forward/loss end"] >= mem.weights_bytes + mem.optimizer_bytes + mem.gradients_bytes
    z2 = _states(_inventory("smollm2-135m", "zero2", 2), "zero2", 2)
    assert z2.phase_peaks["forward/loss end"] == z2.weights_bytes + z2.optimizer_bytes


def test_zero3_keeps_what_it_reuses_within_max_reuse_distance_gathered():
    """``stage3_max_reuse_distance`` = 1e9 values: after its forward a module stays gathered when its backward
    comes within 1e9 traversed values, i.e. 2 x (values after it) <= 1e9. Llama-2-13B (hand count from its
    config: LM head 32000 x 5120, a decoder layer 4 x 5120^2 + 3 x 5120 x 13824 without its two 5120-value norms,
    which are persistent): the LM head and the last two layers stay (after them: 0, 163.8M, 481.0M values; the
    third-last has 798.2M after it), plus the layer being computed and the 5e7-value prefetch bucket. A model
    of under 5e8 values stays gathered whole (Qwen2.5-0.5B: 494M)."""
    from estimator.memory import zero3_gathered_values

    head, layer = 32000 * 5120, 4 * 5120**2 + 3 * 5120 * 13824
    assert zero3_gathered_values(_inventory("llama-2-13b", "zero3", 2)) == head + 2 * layer + layer + 50_000_000
    inv = _inventory("qwen2.5-0.5b", "zero3", 8)
    assert zero3_gathered_values(inv) == sum(t.numel for t in inv.tensors if t.numel > DS_PARAM_PERSISTENCE_THRESHOLD)


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    """A 4-layer tiny Llama config.json, as tests/test_estimate.py builds it."""
    import json

    from runner.train.tinymodel import tiny_config

    path = tmp_path_factory.mktemp("tiny-cfg") / "config.json"
    path.write_text(json.dumps(tiny_config("llama", vocab_size=512, hidden_size=64, layers=4).to_dict()))
    return str(path)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_deepspeed_optimizer_states_are_those_of_its_flat_fp32_groups(optimizer, tiny_cfg):
    """DeepSpeed hands the optimizer one flat 1-D fp32 master tensor per Trainer param group, so the states are
    those the real optimizer keeps for such tensors (Adafactor cannot factor a 1-D tensor: a full fp32 second
    moment), plus the 4 B master copy. Measured here by stepping the real optimizers on those flat tensors."""
    torch = pytest.importorskip("torch")
    from transformers.optimization import Adafactor

    from estimator.memory import optimizer_state_bytes

    inv = _inventory(tiny_cfg, "zero2", 2)
    assert all(trainer_param_groups(inv))  # both groups hold tensors: weights, and norms
    flats = [torch.zeros(sum(t.numel for t in g), requires_grad=True) for g in trainer_param_groups(inv) if g]
    if optimizer == "adamw":
        opt = torch.optim.AdamW(flats, foreach=True)
    else:
        opt = Adafactor(flats, lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False)
    for f in flats:
        f.grad = torch.ones_like(f)
    opt.step()
    measured = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                   if torch.is_tensor(v) and k != "step")
    master = DS_FP32_BYTES * inv.trainable_params
    assert optimizer_state_bytes(inv, optimizer, "zero2", "full") == measured + master
