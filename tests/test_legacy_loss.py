"""The causal-LM losses of transformers <= 4.48 (``TraceSettings.loss_impl``) against real CPU steps.

transformers 4.46-4.48 ``loss/loss_utils.py ForCausalLMLoss`` upcast the logits to fp32 and then copied the first
``seq - 1`` positions into a contiguous fp32 tensor before the cross-entropy ("shifted-copy"); <= 4.45 did the same
with the upcast in the model's forward (``self.lm_head(...).float()``: "upcast-in-forward"); 4.49.0 (PR #35646)
pads the labels instead. ``estimator.validation`` traces each published row with the loss of its transformers.
Expected numbers here come from independent sources: transformers' own ``ForCausalLMLoss`` (the value), and
PyTorch's MemTracker over a real CPU step with the old loss installed (the bytes).
"""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

from estimator.trace import (TraceSettings, extrapolate, legacy_causal_lm_loss, loss_for_trace,  # noqa: E402
                             trace_settings_key, trace_slice)

BATCH, SEQ, VOCAB = 2, 128, 512
OLD_KEY = "124205d8c0009be2a94c5396"  # trace_settings_key(_config(), TraceSettings(method="lora", dtype="bf16")) at c778b18


def _config(layers: int = 3):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


@pytest.mark.parametrize("num_items", [None, 150])
def test_legacy_loss_has_the_value_and_gradient_of_transformers_loss(num_items):
    """Same loss and logits gradient as the installed transformers' ForCausalLMLoss (mean over non-ignored
    labels, or sum / num_items_in_batch as the Trainer passes it), on bf16 logits with ignored positions."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    logits = torch.randn(BATCH, SEQ, VOCAB, dtype=torch.bfloat16)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels[:, :10] = -100
    n = None if num_items is None else torch.tensor(num_items)
    ours_in = logits.clone().requires_grad_()
    theirs_in = logits.clone().requires_grad_()
    ours = legacy_causal_lm_loss(ours_in, labels, VOCAB, num_items_in_batch=n)
    theirs = ForCausalLMLoss(theirs_in, labels, VOCAB, num_items_in_batch=n)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_in.grad, theirs_in.grad)


def _real_peaks(cfg, loss_impl: str, autocast: bool = False) -> tuple[int, int]:
    """(forward + loss, whole step) peak bytes above the weights of one real fp32 CPU step of ``cfg`` with
    ``loss_impl`` installed, from PyTorch's MemTracker (real tensors). The input ids and labels are two tensors
    made inside the tracker, as the trace makes them; the trace's peaks are above the step start, so they are
    taken off here (2 x batch x seq x 8 B)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    model.train()
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    inputs = 2 * BATCH * SEQ * 8
    peaks = []
    for backward in (False, True):
        model.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker, loss_for_trace(model, loss_impl):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ))
            labels = ids.clone()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=labels).loss
            if backward:
                loss.backward()
        del loss, ids, labels
        peaks.append(next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"] - weights - inputs)
    return peaks[0], peaks[1]


@pytest.mark.parametrize("impl", ["shifted-copy", "upcast-in-forward"])
def test_old_loss_traces_match_a_real_step_with_the_old_loss(impl):
    """fp32: the trace with an old loss has the forward and whole-step peaks of a real CPU step running it, byte for
    byte (and the current loss those of a step with the current one). The old loss's forward peak is above the
    current one's by the fp32 copy of the shifted logits, batch x (seq - 1) x vocab x 4 B, less the label tensors
    the two handle differently (int64, a few batch x seq x 8 B). (In fp32 the LM head's output already is fp32, so
    upcast-in-forward changes nothing more.)"""
    cfg = _config()
    kw = dict(method="full", dtype="fp32", batch_size=BATCH, seq_len=SEQ, attention="sdpa")
    legacy = extrapolate(trace_slice(cfg, TraceSettings(loss_impl=impl, **kw)), 3, None)
    current = extrapolate(trace_slice(cfg, TraceSettings(**kw)), 3, None)
    legacy_fwd, legacy_step = _real_peaks(cfg, impl)
    current_fwd, current_step = _real_peaks(cfg, "current")
    assert (legacy_fwd, legacy_step) == (legacy.forward_peak_rel_bytes,
                                         max(legacy.forward_peak_rel_bytes, legacy.backward_peak_rel_bytes))
    assert (current_fwd, current_step) == (current.forward_peak_rel_bytes,
                                           max(current.forward_peak_rel_bytes, current.backward_peak_rel_bytes))
    copy = BATCH * (SEQ - 1) * VOCAB * 4
    assert copy - 4 * BATCH * SEQ * 8 <= legacy_fwd - current_fwd <= copy, (legacy_fwd, current_fwd, copy)


def test_old_losses_under_bf16_autocast_change_the_peak_as_a_real_step():
    """bf16 autocast over fp32 weights (HF Trainer bf16=True): what each old loss adds to the forward peak is what
    it adds in a real CPU step, to the byte. (Under autocast MemTracker's forward peaks are a constant 96 KiB above
    the trace's whatever the loss, so the differences are compared.) 4.46-4.48 keep the bf16 logits next to the
    fp32 ones; <= 4.45 free them as the forward upcasts: the two differ by batch x seq x vocab x 2 B exactly."""
    cfg = _config()
    kw = dict(method="full", dtype="bf16", batch_size=BATCH, seq_len=SEQ, attention="sdpa")
    traced = {impl: extrapolate(trace_slice(cfg, TraceSettings(loss_impl=impl, **kw)), 3, None).forward_peak_rel_bytes
              for impl in ("current", "shifted-copy", "upcast-in-forward")}
    real = {impl: _real_peaks(cfg, impl, autocast=True)[0] for impl in traced}
    for impl in ("shifted-copy", "upcast-in-forward"):
        assert traced[impl] - traced["current"] == real[impl] - real["current"] > 0, (impl, traced, real)
    assert real["shifted-copy"] - real["upcast-in-forward"] == BATCH * SEQ * VOCAB * 2


def test_lora_bf16_activations_with_the_old_loss_match_a_real_step(tmp_path):
    """LoRA on a bf16 base under bf16 autocast (the runner's regime, fms-acceleration's LoRA rows): what the old loss
    changes in the activations held at the end of forward + loss is what it changes in a real CPU step (saved-tensor
    hooks, ``tests/test_memory_exact.py _real_step``), to the byte; both within 2% of the real step, as
    ``test_full_and_lora_match_a_real_step`` holds the current loss (on torch 2.13 CPU both are 32 KiB above it)."""
    from transformers import AutoModelForCausalLM

    from estimator.engine import estimate
    from estimator.request import EstimateRequest
    from tests.test_memory_exact import _config_file, _real_step, with_lora

    cfg = _config()
    req = EstimateRequest(model=_config_file(tmp_path, cfg), method="lora", dtype="bf16", batch_size=BATCH,
                          seq_len=SEQ, attention="sdpa", gpu="a100-80gb", rank=8, dropout=0.0)
    held, real = {}, {}
    for impl in ("current", "shifted-copy"):
        mem = estimate(req, loss_impl=impl).memory
        assert mem.activation_source == "traced"
        held[impl] = mem.activations_bytes
        torch.manual_seed(0)
        model = with_lora(AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16))
        with loss_for_trace(model, impl):
            real[impl] = _real_step(model, "sdpa", "bf16")["activations"]
        assert abs(held[impl] - real[impl]) <= 0.02 * real[impl], (impl, held[impl], real[impl])
    assert held["shifted-copy"] - held["current"] == real["shifted-copy"] - real["current"] != 0


def test_loss_impl_is_in_the_cache_key_and_the_default_keeps_the_old_key():
    """The old loss changes the trace, so it is part of the cache key; the default ("current") keeps the key traces
    had before the field existed, so the disk caches of every default estimate stay valid."""
    cfg = _config()
    st = TraceSettings(method="lora", dtype="bf16")
    assert trace_settings_key(cfg, st) != trace_settings_key(cfg, st.model_copy(update={"loss_impl": "shifted-copy"}))
    # the key of these settings at commit c778b18 (before loss_impl existed), printed by that commit's code
    assert trace_settings_key(cfg, st) == OLD_KEY


def test_loss_is_restored_after_the_step():
    from transformers import AutoModelForCausalLM
    from transformers.loss.loss_utils import ForCausalLMLoss

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config())
    with loss_for_trace(model, "shifted-copy"):
        assert model.loss_function is legacy_causal_lm_loss
    assert model.loss_function is ForCausalLMLoss


def test_validation_rows_use_the_loss_of_their_transformers():
    """fms-acceleration's table (@04702cc, May 2024) ran transformers < 4.40 (its pin), peft's method comparison
    5.13.1, LitGPT none; the version boundaries are those of the 4.45.2 / 4.46.0 / 4.48.3 / 4.49.0 sources."""
    from estimator.trace import loss_impl_for_version

    assert [loss_impl_for_version(v) for v in [(4, 39), (4, 45), (4, 46), (4, 48), (4, 49), (5, 24), None]] == [
        "upcast-in-forward", "upcast-in-forward", "shifted-copy", "shifted-copy", "current", "current", "current"]
    from estimator.validation import loss_impl_for, rows

    impl = {r["id"]: loss_impl_for(r) for r in rows()}
    assert impl["fms-qlora-bs4"] == impl["fms-lora-bs4"] == impl["fms-full-bs4"] == "upcast-in-forward"
    assert impl["peft-mc-lora-r32"] == "current"
    assert impl["litgpt-lora-7b-bs1"] == "current"
