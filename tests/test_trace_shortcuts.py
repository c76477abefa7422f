"""The trace's dispatch shortcuts (device queries answered from the fake tensor, views and Python-decomposed ops
answered by their meta kernel) change its speed only: the same step traced with every op sent through
FakeTensorMode gives the same segments, byte for byte and FLOP for FLOP."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from estimator import trace  # noqa: E402
from estimator.trace import TraceSettings, build_training_model, run_traced_step  # noqa: E402

_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512)


def _configs():
    return {
        "llama": transformers.LlamaConfig(**_SMALL),
        "gemma2": transformers.Gemma2Config(**_SMALL, head_dim=16, sliding_window=32),
        "mixtral": transformers.MixtralConfig(**_SMALL, num_local_experts=4, num_experts_per_tok=2),
    }


def _trace(cfg, st, shortcuts: bool, monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    live_bytes = trace._LiveBytes
    monkeypatch.setattr(trace, "_LiveBytes", lambda: live_bytes(shortcuts=shortcuts))
    FakeTensorMode.cache_clear()
    before = FakeTensorMode.cache_hits + FakeTensorMode.cache_misses
    result = run_traced_step(build_training_model(cfg, st), st)
    monkeypatch.setattr(trace, "_LiveBytes", live_bytes)
    return result.model_dump(exclude={"seconds"}), FakeTensorMode.cache_hits + FakeTensorMode.cache_misses - before


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
@pytest.mark.parametrize("settings", [
    dict(method="lora", base_dtype="bf16", grad_checkpointing=True),
    dict(method="qlora", dora=True),
    dict(method="full", dtype="fp32"),
    dict(method="full", weights_16bit=True),
], ids=["lora-bf16-ckpt", "qlora-dora", "full-fp32", "full-16bit"])
def test_shortcuts_trace_the_same_step(arch, settings, monkeypatch):
    cfg = _configs()[arch]
    st = TraceSettings(batch_size=2, seq_len=64, rank=4, alpha=8, targets="all-linear",
                       attention="eager" if arch == "gemma2" else "sdpa", **settings)
    fast, fast_fake_ops = _trace(cfg, st, True, monkeypatch)
    slow, slow_fake_ops = _trace(cfg, st, False, monkeypatch)
    assert fast == slow
    # the shortcuts did answer ops (views at least) that FakeTensorMode answers otherwise
    assert fast_fake_ops < slow_fake_ops
