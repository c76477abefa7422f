"""Property tests (hypothesis): memory grows with batch, sequence and rank; LoRA < full; QLoRA weights <
LoRA weights; ``fits`` agrees with the peak against the GPU memory. On a tiny Llama config so that each
example is one sub-second trace (traces are cached, so repeated shapes cost nothing)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from estimator import EstimateRequest, estimate  # noqa: E402

SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cfg_path(tmp_path_factory):
    from runner.train.tinymodel import tiny_config

    cfg = tiny_config("llama", vocab_size=512, hidden_size=64, layers=3)
    cfg.max_position_embeddings = 2048
    path = tmp_path_factory.mktemp("prop-cfg") / "config.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def _peak(path, **kw):
    return estimate(EstimateRequest(model=path, **kw)).memory


@SETTINGS
@given(method=st.sampled_from(["full", "lora", "qlora"]), batch=st.integers(1, 6), seq=st.sampled_from([32, 64, 128]),
       attention=st.sampled_from(["sdpa", "eager"]))
def test_memory_grows_with_batch_and_sequence(cfg_path, method, batch, seq, attention):
    base = _peak(cfg_path, method=method, batch_size=batch, seq_len=seq, attention=attention)
    more_batch = _peak(cfg_path, method=method, batch_size=batch + 1, seq_len=seq, attention=attention)
    more_seq = _peak(cfg_path, method=method, batch_size=batch, seq_len=seq * 2, attention=attention)
    assert more_batch.activations_bytes > base.activations_bytes
    assert more_seq.activations_bytes > base.activations_bytes
    assert more_batch.peak_bytes >= base.peak_bytes and more_seq.peak_bytes >= base.peak_bytes


@SETTINGS
@given(rank=st.sampled_from([1, 2, 4, 8, 16, 32]), targets=st.sampled_from(["attention-qv", "all-linear"]))
def test_memory_grows_with_rank_and_lora_beats_full(cfg_path, rank, targets):
    lo = _peak(cfg_path, method="lora", rank=rank, targets=targets, seq_len=64)
    hi = _peak(cfg_path, method="lora", rank=rank * 2, targets=targets, seq_len=64)
    full = _peak(cfg_path, method="full", seq_len=64)
    assert hi.weights_bytes > lo.weights_bytes and hi.optimizer_bytes > lo.optimizer_bytes
    assert hi.peak_bytes >= lo.peak_bytes
    assert lo.gradients_bytes + lo.optimizer_bytes < full.gradients_bytes + full.optimizer_bytes
    assert lo.peak_bytes < full.peak_bytes


@SETTINGS
@given(rank=st.sampled_from([4, 16, 64]), dora=st.booleans())
def test_qlora_weights_below_lora_weights(cfg_path, rank, dora):
    q = _peak(cfg_path, method="qlora", rank=rank, dora=dora, seq_len=32)
    lora = _peak(cfg_path, method="lora", rank=rank, dora=dora, seq_len=32)
    assert q.weights_bytes < lora.weights_bytes


@SETTINGS
@given(gpu=st.sampled_from(["t4", "rtx-3090", "a100-40gb", "h100-80gb"]), batch=st.integers(1, 4096))
def test_fits_agrees_with_peak(cfg_path, gpu, batch):
    est = estimate(EstimateRequest(model=cfg_path, method="full", gpu=gpu, dtype="fp16", batch_size=batch,
                                   seq_len=2048, attention="eager"))
    assert est.fits == (est.memory.peak_bytes + est.memory.headroom_bytes <= est.gpu.usable_bytes)
