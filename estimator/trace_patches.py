"""Process-global patches of transformers that the fake-tensor trace needs, applied under one lock.

``patched_for_trace`` is the only entry point: it takes ``TRACE_LOCK`` (the patches are module attributes, seen by
every thread) and applies both patches for the length of one traced step.
"""

from __future__ import annotations

import contextlib
import functools
import threading

TRACE_LOCK = threading.Lock()  # the packed-sequence and grouped_mm patches are process-global


@contextlib.contextmanager
def patched_for_trace(fake: bool = True):
    """The patches of one traced step: packed-sequence detection off always, the grouped-mm patch on fake tensors."""
    grouped = _fake_friendly_grouped_mm() if fake else contextlib.nullcontext()
    with TRACE_LOCK, _no_packed_sequence_detection(), grouped:
        yield


@contextlib.contextmanager
def _no_packed_sequence_detection():
    """transformers would inspect position ids for packed sequences (data-dependent); a padded-free training
    batch has none, so say so (REFERENCE.md: fake and real runs then agree byte for byte)."""
    from transformers import masking_utils

    orig = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = orig


@contextlib.contextmanager
def _fake_friendly_grouped_mm():
    """transformers 5 runs MoE experts with ``torch._grouped_mm`` (``experts_implementation="grouped_mm"``, its
    default). PyTorch's meta kernel for it mirrors the CUDA kernel and accepts bf16 only, while the CPU kernel
    the real step runs takes fp32 too (fp32 master weights of full fine-tuning). For non-bf16 weights the trace
    takes transformers' own ``grouped_mm_fallback`` op instead (same output and saved tensors, with a fake
    kernel) when the weight trains, and ``FrozenGroupedMM`` when it is frozen (LoRA on an fp32 base). Every
    tensor of either path is sized by tokens x top_k, not by the routing, so no routing has to be assumed."""
    import torch
    from transformers.integrations import moe  # transformers>=5 (pyproject): its experts interface

    frozen_mm = _frozen_grouped_mm_cls()
    orig_can, orig_mm = moe._can_use_grouped_mm, moe._grouped_mm

    def grouped_mm(input, weight, offs):
        if weight.dtype != torch.bfloat16 and not weight.requires_grad:
            return frozen_mm.apply(input.to(weight.dtype), weight)
        return orig_mm(input, weight, offs)

    moe._can_use_grouped_mm = lambda input, weight, offs: (orig_can(input, weight, offs)
                                                           and weight.dtype == torch.bfloat16)
    moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        moe._can_use_grouped_mm, moe._grouped_mm = orig_can, orig_mm


@functools.lru_cache(maxsize=1)
def _frozen_grouped_mm_cls():
    import torch

    class FrozenGroupedMM(torch.autograd.Function):
        """``aten._grouped_mm`` with a frozen weight, as autograd runs it: nothing saved but the weight, backward
        computes only the input gradient. ``mm`` with one expert's matrix has the same output and FLOPs (every
        row meets exactly one expert), so the trace's bytes and FLOP counts are those of the grouped op."""

        @staticmethod
        def forward(ctx, input, weight):
            ctx.save_for_backward(weight)
            return torch.mm(input, weight[0])

        @staticmethod
        def backward(ctx, grad):
            (weight,) = ctx.saved_tensors
            return torch.mm(grad, weight[0].t()), None

    return FrozenGroupedMM
