"""The estimator against GPU memory measured by others and published (data/validation/published_gpu_memory.csv).

Every row is estimated in its own regime (method, dtype, master dtype, optimizer, adapter, batch, length,
checkpointing, attention, GPUs, sharding) and estimate / measured must fall in the band of its kind
(``estimator.validation.BANDS``: max_memory_allocated vs our allocated peak, max_memory_reserved vs our reserved
peak, nvidia-smi vs what we say the card holds). The measured figures are independent: other people's runs on
real GPUs, each row citing its source.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from estimator.validation import BANDS, compare, compare_all, kind_of, request_for, rows  # noqa: E402


def test_table_is_well_formed_and_every_row_maps_to_a_request():
    from estimator.catalog import resolve_model

    table = rows()
    assert len(table) >= 20
    ids = [r["id"] for r in table]
    assert len(ids) == len(set(ids))
    for r in table:
        assert r["source"].strip(), r["id"]  # every figure says where it comes from
        assert r["measured"] in ("max_allocated", "max_reserved", "nvidia_smi"), r["id"]
        assert int(float(r["value_bytes"])) > 2**30, r["id"]
        assert kind_of(r) in BANDS
        resolve_model(r["catalog_id"])  # a catalog id, no "config" placeholder
        req, _ = request_for(r)
        assert req.gpu == r["gpu"] and req.batch_size == int(r["batch"]) and req.seq_len == int(r["seq_len"])


def test_issue_case_pure_bf16_full_is_within_one_percent():
    """fms-acceleration, Mistral-7B full fine-tuning, pure bf16, 4 x 4096, checkpointing, one A100-80GB:
    72,971,724,288 B max_memory_allocated; ours (pure bf16, the runner's regime) within 1%."""
    row = next(r for r in rows() if r["id"] == "fms-full-bs4")
    c = compare(row)
    assert abs(c.ratio - 1) < 0.01, c


def test_fsdp_rows_are_within_ten_percent():
    """fms-acceleration's 2-GPU FSDP rows (A100-80GB, max_memory_allocated per GPU): pure 16-bit full
    fine-tuning, LoRA and QLoRA (Mistral-7B, Llama-2-70B). Before FSDP was modelled per regime (fp32 master
    weights for every row) they were 1.09-1.99x; now each is within the issue's 10%."""
    out = [compare(r) for r in rows() if kind_of(r) == "fsdp"]
    assert len(out) == 5
    assert all(abs(c.ratio - 1) <= 0.10 and not c.regime_differs for c in out), [(c.id, c.ratio) for c in out]
    full = [c.ratio for c in out if c.id.startswith("fms-full-fsdp")]
    assert full and all(abs(r - 1) < 0.02 for r in full), full  # optimizer-step peak: shards only
    # throughput per GPU, as HF Trainer's train_tokens_per_second counts it (per device): the 2-GPU rows land in
    # the one-GPU rows' spread (0.77-1.07 at the catalog's default MFU); compared with both GPUs' total they
    # were 1.4-2.3x, which read as a time model too fast under FSDP
    tps = {c.id: c.estimated_tokens_per_s / c.measured_tokens_per_s for c in out}
    assert all(0.70 <= r <= 1.10 for r in tps.values()), tps


@pytest.mark.slow
def test_every_published_row_is_within_its_band():
    """All rows (about 30 s with warm trace caches, a few minutes cold)."""
    out = compare_all()
    bad = [(c.id, c.kind, round(c.ratio, 3), BANDS[c.kind]) for c in out
           if not BANDS[c.kind][0] <= c.ratio <= BANDS[c.kind][1]]
    assert not bad, bad
    # the goal of issue 10 on the runs whose regime we model: within 10% (worst row: QLoRA, -2.6%)
    hf = [c.ratio for c in out if c.kind == "hf_allocated"]
    assert len(hf) >= 6 and all(abs(r - 1) <= 0.10 for r in hf), hf


def test_each_row_is_traced_with_the_loss_of_its_transformers():
    """The fms-acceleration table ran transformers 4.39 (its pin at @04702cc), whose Mistral forward upcasts the
    logits to fp32 and whose loss copies the shifted ones: 2 B per logit more than transformers 5 at the loss
    (1 GiB at 4 x 4096 tokens x 32000). The LoRA row's peak is there (forward + loss: ours 0.999 -> 1.005 of the
    measured max_memory_allocated, above it by peft < 0.12's bf16 adapters that we count fp32, 78 MiB); the QLoRA
    row's stays in backward, where the old loss adds nothing (0.998 both ways; its gap was the stack's
    checkpointing and bitsandbytes: the next test)."""
    table = {r["id"]: r for r in rows()}
    moved = {i: (compare(table[i], loss_by_version=False).ratio, compare(table[i]).ratio)
             for i in ("fms-qlora-bs4", "fms-lora-bs4")}
    (q0, q1), (l0, l1) = moved["fms-qlora-bs4"], moved["fms-lora-bs4"]
    assert q0 == q1, moved
    assert l0 < l1 < 1.01, moved


def test_the_qlora_rows_hold_what_their_2024_stack_held():
    """fms-acceleration's QLoRA rows (2024-05-27) checkpointed reentrantly (transformers 4.39's default; peft and TRL
    pass ``{}``) and ran bitsandbytes < 0.43.2, whose MatMul4Bit kept its 16-bit input in ``ctx.tensors``. At the
    peak, the backward of the recomputed last layer, that stack holds what our runner's does not: the recomputed
    layer's output (fp32 with peft's upcast, 4 B x hidden per token: reentrant) and the fp16 copies bitsandbytes
    made of the fp32 inputs of q, k, v, gate, up (2 B x hidden each) and down (2 B x intermediate): 86,016 B per
    token for Mistral-7B, 1.31 GiB at 4 x 4096 tokens (0.913 -> 0.974 of the measured peak; 0.998 with the
    stack's rotary caches, the next test)."""
    table = {r["id"]: r for r in rows()}
    h, inter = 4096, 14336
    for rid, tokens in (("fms-qlora-bs4", 4 * 4096), ("fms-qlora-bs8", 8 * 4096)):
        runner, as_run = compare(table[rid], stack_by_version=False), compare(table[rid])
        assert as_run.estimated_bytes - runner.estimated_bytes == tokens * (4 * h + 2 * (5 * h + inter))
        assert 0.97 < as_run.ratio < 1.0, as_run


def test_the_2024_stack_holds_a_rotary_cache_in_every_layer():
    """transformers 4.39 built a cos and a sin cache, (max_position_embeddings, head_dim) in the load dtype, in
    every attention layer (modeling_mistral.py ``MistralRotaryEmbedding._set_cos_sin_cache``, one per
    ``MistralAttention``); transformers 5 keeps ``inv_freq`` only. For Mistral-7B in 16 bits: 32 x 2 x 32768 x 128
    x 2 B = 512 MiB, held from load to the end of training. The fms-acceleration table's
    ``torch_mem_alloc_in_bytes`` after training (refs/a100_80gb.csv @04702cc: 44,004,763,136 B for full
    fine-tuning at batch 4) is our weights + states + cuBLAS workspaces + these 512 MiB within 0.5 MiB; with them
    counted, the full rows' peaks (one GPU and FSDP, where buffers are not sharded) come within 1 MiB of the
    measured max_memory_allocated."""
    from estimator.catalog import resolve_model
    from estimator.memory import legacy_rope_cache_bytes

    assert legacy_rope_cache_bytes(resolve_model("mistral-7b").hf_config(), 2) == 32 * 2 * 32768 * 128 * 2
    assert legacy_rope_cache_bytes(resolve_model("llama-2-70b").hf_config(), 2) == 80 * 2 * 4096 * 128 * 2
    assert legacy_rope_cache_bytes(resolve_model("qwen2.5-7b").hf_config(), 2) == 0  # not a model type checked
    table = {r["id"]: r for r in rows()}
    for rid in ("fms-full-bs4", "fms-full-bs8", "fms-full-fsdp2-bs2", "fms-full-fsdp2-bs4", "fms-qlora-bs4"):
        as_run, installed = compare(table[rid]), compare(table[rid], buffers_by_version=False)
        assert as_run.estimated_bytes - installed.estimated_bytes == 32 * 2 * 32768 * 128 * 2, rid
        if rid.startswith("fms-full"):
            assert abs(as_run.estimated_bytes - as_run.measured_bytes) < 2**20, as_run
    # the runner's stack (transformers 5) has no such cache: rows of it are unchanged
    peft_row = table["peft-mc-lora-r32"]
    assert compare(peft_row).estimated_bytes == compare(peft_row, buffers_by_version=False).estimated_bytes
