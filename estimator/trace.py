"""Traced activations: one real training step of a 2-layer slice of the real architecture, on fake tensors.

How (see ``shared/REFERENCE.md``, "Memory of one training step"):

1. The model is the real transformers architecture with ``num_hidden_layers`` cut to 2, or, when layers differ
   (sliding/full attention of any ratio such as Gemma-2's 1:1 or Gemma-3's 5:1, dense layers before MoE ones as
   in DeepSeek or Qwen-MoE), to layer 0 plus one layer of each other kind (``estimator/slicing.py``), built on
   the meta device with the real peft adapter, then materialised with ``to_empty(device="cpu")`` inside ``FakeTensorMode`` so that no byte is
   allocated. QLoRA's frozen Linears are replaced by a module that stores exactly what bitsandbytes stores
   (NF4 + double quantization) and runs the same ops as bitsandbytes' training path on CUDA
   (dequantize to the compute dtype, ``F.linear``, save only the packed weight for backward; ``estimator/nf4.py``).
   Two transformers functions are patched for the step (``estimator/trace_patches.py``).
2. A ``TorchDispatchMode`` (``_LiveBytes``) sees every tensor an op creates, keeps a weak reference to its
   storage and so knows the live bytes after every op; the same mode counts FLOPs with PyTorch's own
   ``torch.utils.flop_counter.flop_registry``.
3. Markers (forward pre-hooks of each decoder layer, gradient hooks on each layer's output) cut the step
   into segments: pre, layer 0, layer 1, post (forward), then the same backwards. For each segment we keep
   the change in live bytes, the peak above its start and its FLOPs.
4. The full model's step is the slice's segments replayed, each layer after the first by its slice twin of the
   same kind (exact: layers of one kind run the same ops on the same shapes). MoE experts run in transformers'
   grouped layout, whose tensors are sized by tokens x top_k whatever the routing (``estimator/experts.py``).
   ``extrapolate`` returns activations held at the end of the forward pass, the forward/backward peak above the weights, and the FLOPs of one micro-step.

The step traced is the one the runner runs with HF Trainer: weights as stored (fp32 master weights for full
fine-tuning; for LoRA the frozen base in the run's dtype (``base_dtype``: bf16/fp16 on one GPU or DDP, fp32
for fp32 runs) with fp32 adapters, as ``runner/train/recipe.py`` loads it; NF4 + fp32 leftovers for QLoRA after
``prepare_model_for_kbit_training``; everything 16-bit under ZeRO/FSDP, ``weights_16bit``), forward and loss
under ``torch.autocast(dtype=bf16|fp16)`` when the run dtype is 16-bit (also over a 16-bit LoRA base: the
Trainer autocasts it, which casts the fp32 adapters' weights), backward outside autocast. CPU autocast is
used for the trace (no CUDA here); for the Llama family the CPU and CUDA autocast op lists agree on every op
that changes a dtype (norms, softmax and the loss upcast explicitly in transformers).

Traces are cached in memory and on disk (``cache_dir()/traces``) keyed by everything that changes them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
import time
import weakref
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from estimator.errors import EstimatorError, TraceError
from estimator.nf4 import nf4_linear_cls, quantize_frozen_linears
from estimator.slicing import decoder_layers, layer_kinds, layer_map, slice_config, slice_layer_count
from estimator.trace_patches import patched_for_trace

# bitsandbytes' CPU backend logs a warning about an optional kernels package at import (peft imports it);
# nothing here runs bitsandbytes kernels, so keep the CLI output clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TRACE_VERSION = 7  # bump when the trace changes meaning: old disk caches are ignored (6: LoRA base_dtype; 7: MoE)


# ------------------------------------------------------------------------------------------------ results


class Segment(BaseModel):
    """One stretch of the traced step between two markers (bytes are bytes, FLOPs are FLOPs)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="pre | layer | post")
    phase: Literal["forward", "backward"]
    layer: int | None = Field(None, description="index of the slice layer, None for pre/post")
    delta_bytes: int = Field(description="live bytes at the end minus live bytes at the start")
    peak_rel_bytes: int = Field(description="highest live bytes inside the segment minus live bytes at its start")
    flops: int = Field(description="FLOPs counted by torch.utils.flop_counter formulas")
    freed_from: dict[str, int] = Field(default_factory=dict, description=(
        "exit segment only: bytes freed when autocast exits (its weight-cast cache), by the segment that "
        "allocated them (phase:name:layer)"))


class SliceTrace(BaseModel):
    """What one traced step of the slice measured."""

    model_config = ConfigDict(frozen=True)

    slice_layers: int
    layer_types: list[str] | None = None
    base_bytes: int = Field(description="live bytes when the step starts (weights and buffers of the slice)")
    segments: list[Segment]
    seconds: float = Field(description="wall time of the trace")
    version: int = TRACE_VERSION


class Extrapolated(BaseModel):
    """The traced step replayed for the full model; bytes above the weights/optimizer already resident."""

    activations_bytes: int = Field(description="held at the end of forward + loss")
    forward_peak_rel_bytes: int = Field(description="forward/loss peak above the step start")
    backward_peak_rel_bytes: int = Field(description="backward peak above the step start (grads included)")
    backward_end_rel_bytes: int = Field(description="live bytes after backward above the step start (grads)")
    flops: int = Field(description="FLOPs of one micro-step (forward + backward, recompute included)")
    forward_flops: int


# ------------------------------------------------------------------------------------------ live-bytes mode


class _LiveBytes:
    """TorchDispatchMode factory: live storage bytes after every op, segment peaks and FLOPs.

    ``_LiveBytes(shortcuts=False)`` sends every op through FakeTensorMode (device queries and the ops answered by
    their meta kernel included): ``tests/test_trace_shortcuts.py`` checks that the traces are the same.
    """

    def __new__(cls, *args, **kwargs):  # built lazily so that importing this module does not import torch
        return _live_bytes_cls()(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _live_bytes_cls():
    import torch
    from torch._decomp import decomposition_table, meta_table
    from torch._subclasses.fake_tensor import (FakeTensor, FakeTensorMode, in_kernel_invocation_manager,
                                               torch_decomp_decompositions)
    from torch.utils._pytree import tree_flatten
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    tensor_type = torch.Tensor
    device_query = torch.ops.prim.device.default
    meta = torch.device("meta")
    aten = torch.ops.aten
    # Ops answered by their meta kernel directly (``_on_meta``), without FakeTensorMode's dispatch, when every
    # tensor argument is a plain FakeTensor (no constant value, no symbolic sizes) of one mode and device:
    # - views of one tensor (a quarter of the trace's ops): FakeTensorMode runs the same meta kernel on the
    #   argument's meta storage (``view``/``_unsafe_view`` through a Python reshape helper), after building a
    #   cache key and, on a miss, an entry;
    # - the ops FakeTensorMode runs as a Python decomposition although they have a meta kernel (the loss,
    #   log-softmax and their backwards, silu_backward, slice_backward, _to_copy: one nll_loss_forward is some 25
    #   fake ops): the meta kernel gives the same output tensors (shape, dtype, strides, a storage of their own),
    #   and the decomposition's intermediates were never seen by this mode either. The traces are equal field by
    #   field (132 traces: 11 catalog architectures, 5 of them MoE, x 12 settings).
    views = {aten.view.default, aten._unsafe_view.default, aten.t.default, aten.transpose.int, aten.slice.Tensor,
             aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.permute.default,
             aten.select.int, aten.detach.default, aten.alias.default, aten._reshape_alias.default}
    on_meta: dict = {}  # op -> answered by its meta kernel

    def _answered_on_meta(func) -> bool:
        if func not in on_meta:
            on_meta[func] = func in views or (
                isinstance(func, torch._ops.OpOverload) and func.namespace == "aten"
                # FakeTensorMode._dispatch_impl's condition for a Python decomposition
                and func not in meta_table and torch.Tag.view_copy not in func.tags
                and func not in FakeTensorMode._cpp_meta_supports_symint
                and func in decomposition_table and torch_decomp_decompositions(func)
                and torch._C._dispatch_has_computed_kernel_for_dispatch_key(func.name(), "Meta"))
        return on_meta[func]

    def _on_meta(func, args, kwargs):
        """``func`` run by its meta kernel on plain FakeTensor arguments, outputs wrapped as FakeTensors of their
        device (``wrap_meta_outputs_with_default_device_logic``); None when the arguments are not plain."""
        mode = device = None
        for a in args:
            if isinstance(a, tensor_type):
                if (type(a) is not FakeTensor or a.constant is not None or a._has_symbolic_sizes_strides
                        or (mode is not None and (a.fake_mode is not mode or a.fake_device != device))):
                    return None
                mode, device = a.fake_mode, a.fake_device
            elif isinstance(a, torch.SymInt) or (isinstance(a, (list, tuple))
                                                 and any(isinstance(e, (tensor_type, torch.SymInt)) for e in a)):
                return None
        if (mode is None or mode.in_kernel_invocation or "device" in kwargs
                or any(isinstance(v, tensor_type) for v in kwargs.values())):
            return None
        try:
            with in_kernel_invocation_manager(mode):
                r = func(*args, **kwargs)
        except NotImplementedError:
            return None  # no meta kernel after all: FakeTensorMode's own path

        def wrap(e):
            if not isinstance(e, tensor_type) or isinstance(e, FakeTensor):
                return e
            return mode.fake_tensor_converter.from_meta_and_device(mode, e, device)

        return wrap(r) if isinstance(r, tensor_type) else type(r)(wrap(e) for e in r)

    class LiveBytes(TorchDispatchMode):
        def __init__(self, shortcuts: bool = True):
            super().__init__()
            self.shortcuts = shortcuts
            self.live = 0
            self._seen: dict[int, weakref.ref] = {}
            self.segments: list[dict] = []
            self._cur: dict | None = None
            self._flops_of: dict = {}  # op -> its FLOP formula, or None (most ops count none)

        # -- storages
        def track(self, t) -> None:
            if not isinstance(t, tensor_type):
                return
            st = t.untyped_storage()
            key = id(st)
            ref = self._seen.get(key)
            if ref is not None and ref() is st:
                return
            nbytes = st.nbytes()
            self.live += nbytes
            born = len(self.segments) if self._cur is not None else -1

            def _gone(_ref, key=key, nbytes=nbytes, born=born):
                self.live -= nbytes
                cur = self._cur
                if cur is not None and cur["name"] == "exit" and born >= 0:
                    cur["frees"][born] = cur["frees"].get(born, 0) + nbytes
                if self._seen.get(key) is _ref:
                    del self._seen[key]

            self._seen[key] = weakref.ref(st, _gone)

        # -- segments
        def mark(self, name: str, phase: str, layer: int | None) -> None:
            self.close()
            self._cur = {"name": name, "phase": phase, "layer": layer, "start": self.live,
                         "peak": self.live, "flops": 0, "frees": {}}

        def close(self) -> None:
            if self._cur is not None:
                cur = self._cur
                self.segments.append({"name": cur["name"], "phase": cur["phase"], "layer": cur["layer"],
                                      "delta_bytes": self.live - cur["start"],
                                      "peak_rel_bytes": max(cur["peak"], self.live) - cur["start"],
                                      "flops": cur["flops"],
                                      "freed_from": {self._label(i): b for i, b in cur["frees"].items()}})
                self._cur = None

        def _label(self, index: int) -> str:
            seg = self.segments[index]
            return f"{seg['phase']}:{seg['name']}:{seg['layer']}"

        def _formula(self, func):
            """The FLOP count of ``func`` as ``(args, kwargs, out) -> int``, or None for the ops that count none."""
            if func not in self._flops_of:
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    self._flops_of[func] = lambda args, kwargs, out: int(formula(*args, **kwargs, out_val=out))
                elif _is_grouped(func):
                    self._flops_of[func] = lambda args, kwargs, out: _grouped_flops(func, args, out)
                else:
                    self._flops_of[func] = None
            return self._flops_of[func]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is device_query and self.shortcuts and isinstance(args[0], FakeTensor):
                # two of every three calls (autocast and autograd ask before most ops): answered as FakeTensor
                # answers it (``fake_tensor._device_handler``), without the trip through FakeTensorMode
                t = args[0]
                return meta if t.fake_mode.in_kernel_invocation else t.fake_device
            kwargs = kwargs or {}
            out = _on_meta(func, args, kwargs) if self.shortcuts and _answered_on_meta(func) else None
            if out is None:
                out = func(*args, **kwargs)
            if isinstance(out, tensor_type):
                self.track(out)
            elif type(out) in (tuple, list) and not any(type(o) in (tuple, list, dict) for o in out):
                for t in out:
                    self.track(t)
            else:
                for t in tree_flatten(out)[0]:
                    self.track(t)
            cur = self._cur
            if cur is not None:
                if self.live > cur["peak"]:
                    cur["peak"] = self.live
                formula = self._formula(func)
                if formula is not None:
                    cur["flops"] += formula(args, kwargs, out)
            return out

    return LiveBytes


def _is_grouped(func) -> bool:
    return str(func._overloadpacket).endswith(("_grouped_mm", "grouped_mm_fallback", "grouped_mm_fallback_backward"))


def _grouped_flops(func, args, out) -> int:
    """FLOPs of the MoE grouped matmuls that ``torch.utils.flop_counter`` has no formula for: every row of the
    token-expert pairs meets one expert's matrix, so 2 x rows x in x out in all, whatever the routing."""
    name = str(func._overloadpacket)
    if name.endswith("_grouped_mm") and len(args) >= 2:
        a, b = args[0], args[1]
        if a.dim() == 2 and b.dim() == 2:  # weight gradient: (in, S) x (S, out) -> (experts, in, out)
            return 2 * a.size(0) * a.size(1) * b.size(1)
        return 2 * out.numel() * a.size(-1)
    if name.endswith("grouped_mm_fallback") and len(args) >= 2:  # transformers' loop: (S, in) x (E, in, out)
        return 2 * args[0].size(0) * args[0].size(1) * args[1].size(2)
    if name.endswith("grouped_mm_fallback_backward") and len(args) >= 2:  # input and weight gradients
        return 4 * args[0].size(0) * args[0].size(1) * args[1].size(2)
    return 0


# --------------------------------------------------------------------------------------------- the slice


class TraceSettings(BaseModel):
    """Everything besides the config that changes a trace (the cache key)."""

    model_config = ConfigDict(frozen=True)

    method: Literal["full", "lora", "qlora"]
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] | str = "attention-qv"
    dora: bool = False
    rslora: bool = False
    adalora: bool = False
    dropout: float = 0.05
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    weights_16bit: bool = Field(False, description=(
        "weights stored in the 16-bit dtype with no autocast (DeepSpeed ZeRO / FSDP mixed precision) instead of "
        "fp32 master weights + autocast"))
    base_dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description=(
        "dtype the frozen base weights are stored in (LoRA): the run's 16-bit dtype when the runner loads the "
        "base in it (one GPU / DDP), adapters stay fp32 (peft autocast_adapter_dtype) and autocast stays on; "
        "QLoRA: 16-bit = the paper's regime (non-quantized weights in it, norms fp32), fp32 = peft's upcast"))
    batch_size: int = 1
    seq_len: int = 512
    grad_checkpointing: bool = False
    attention: Literal["sdpa", "eager"] = "sdpa"
    loss_impl: Literal["current", "shifted-copy", "upcast-in-forward"] = Field("current", description=(
        "the causal-LM loss of the step: current = the installed transformers' ForCausalLMLoss (labels padded, "
        "no copy of the logits); shifted-copy = transformers 4.46-4.48's (an fp32 copy of the shifted logits "
        "made contiguous, alive through the cross-entropy: ``legacy_causal_lm_loss``); upcast-in-forward = "
        "transformers <= 4.45's: the same loss, and the model's forward upcasts the LM head's output to fp32 "
        "(the 16-bit logits die at once, the fp32 ones are the output's)"))
    checkpoint_reentrant: bool = Field(False, description=(
        "gradient checkpointing with use_reentrant=True, transformers 4.x's default when no "
        "gradient_checkpointing_kwargs are given (4.39 ``gradient_checkpointing_enable``; peft/TRL pass ``{}``, "
        "torch's checkpoint then defaults to reentrant): each layer's backward recomputes its forward and runs a "
        "nested backward, holding the recomputed graph (its output and every non-saved ctx attribute) until it "
        "returns. False: the runner's use_reentrant=False"))
    bnb_keeps_input: bool = Field(False, description=(
        "QLoRA: bitsandbytes < 0.43.2, whose MatMul4Bit keeps its 16-bit input in ``ctx.tensors`` (freed only "
        "with its autograd node; ``nf4.nf4_linear_cls``)"))


def _lora_config(model, settings: TraceSettings, total_steps: int = 100):
    """The real peft config for the adapter (through the catalog's ``adapter_config`` when present)."""
    targets = list(settings.targets) if isinstance(settings.targets, tuple) else settings.targets
    method = "adalora" if settings.adalora else "lora"
    from estimator.params import adapter_config

    return adapter_config(model, method=method, rank=settings.rank, alpha=settings.alpha, targets=targets,
                          dora=settings.dora, rslora=settings.rslora, adalora=settings.adalora,
                          total_steps=total_steps, dropout=settings.dropout)


def build_training_model(config, settings: TraceSettings):
    """The model of the run, on the meta device: architecture + peft adapter + NF4 stand-ins for QLoRA.

    Returns the module; call ``to_empty`` inside a FakeTensorMode to use it.
    """
    import torch

    from estimator.params import fresh_meta_model

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
    sixteen = settings.weights_16bit and half is not None and settings.method != "qlora"
    base = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.base_dtype)
    if sixteen:
        base = half
    elif base is None or settings.method == "full":
        base = torch.float32
    model = fresh_meta_model(config, dtype=base)
    if settings.method == "qlora" and base != torch.float32:
        _norms_to_fp32(model)
    model.config.use_cache = False
    model.config._attn_implementation = settings.attention
    if settings.grad_checkpointing:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5; same call as the runner
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": settings.checkpoint_reentrant})
    if settings.method == "full":
        return model
    from peft import get_peft_model

    if settings.grad_checkpointing:
        # the runner (and peft's prepare_model_for_kbit_training) do this with gradient checkpointing:
        # the embedding output requires grad so that checkpointed layers get gradients.
        model.enable_input_require_grads()
    import warnings

    with torch.device("meta"), warnings.catch_warnings():  # adapters straight on meta: no CPU allocation
        warnings.simplefilter("ignore")  # peft/transformers deprecation and meta-device notices
        # autocast_adapter_dtype=True (peft's default, as the runner passes it): fp32 adapters on a 16-bit base
        peft_model = get_peft_model(model, _lora_config(model, settings), autocast_adapter_dtype=True)
    if sixteen:
        peft_model.to(half)  # DeepSpeed / FSDP cast the whole module, adapters included
    if settings.method == "qlora":
        compute = torch.float16 if settings.dtype == "fp16" else torch.bfloat16  # bitsandbytes' compute dtype
        quantize_frozen_linears(peft_model, compute, keeps_input=settings.bnb_keeps_input)
        _quantize_fused_experts(peft_model, compute, keeps_input=settings.bnb_keeps_input)
    return peft_model


def _quantize_fused_experts(peft_model, compute, keeps_input: bool = False) -> None:
    """QLoRA's routed experts as the runner stores them (``runner/train/experts.py``): ``NF4Experts`` with one NF4
    stand-in Linear per expert and matrix, its token-expert pairs split evenly over the experts."""
    from estimator.experts import balanced_split, replace_fused_experts

    def stand_in(d_in, d_out, _w):
        linear = nf4_linear_cls()(d_in, d_out, None, compute)
        linear.keeps_input = keeps_input
        return linear

    replace_fused_experts(peft_model, stand_in, split=lambda ids, experts: balanced_split(ids.numel(), experts))


def _norms_to_fp32(model) -> None:
    """The QLoRA paper's regime (artidoro/qlora ``qlora.py``): modules whose name holds ``norm`` in fp32, the
    rest of the non-quantized weights in the compute dtype; ``runner.train.recipe`` does the same (same rule)."""
    import torch

    for name, module in model.named_modules():
        if "norm" in name:
            module.to(torch.float32)


#: transformers' first release whose ForCausalLMLoss pads the labels instead of copying the shifted logits
#: (huggingface/transformers PR #35646, merged 2025-01-13; 4.48.0-4.48.3 still copy, 4.49.0 pads)
LOSS_PADS_LABELS_FROM = (4, 49)
#: transformers' first release whose ``*ForCausalLM.forward`` keeps the logits in the model's dtype (4.45.2's
#: Mistral/Llama forward ends ``self.lm_head(...).float()``, 4.46.0's does not; the loss upcasts instead)
LOGITS_KEEP_DTYPE_FROM = (4, 46)


def loss_impl_for_version(version: tuple[int, int] | None) -> str:
    """The ``TraceSettings.loss_impl`` of a transformers (major, minor); None: the installed one ("current")."""
    if version is None or version >= LOSS_PADS_LABELS_FROM:
        return "current"
    return "shifted-copy" if version >= LOGITS_KEEP_DTYPE_FROM else "upcast-in-forward"


def legacy_causal_lm_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                          **kwargs):
    """The causal-LM loss as transformers 4.46-4.48 computed it (``loss/loss_utils.py ForCausalLMLoss``).

    ``logits`` (batch, seq, vocab) is upcast to fp32, then its first ``seq - 1`` positions are copied into a
    contiguous fp32 tensor (the shifted logits) that lives, next to the fp32 upcast, until the cross-entropy
    returns; labels lose their first position. Mean over the non-ignored tokens, or sum / ``num_items_in_batch``
    when the Trainer passes it. transformers >= 4.49 pads the labels by one ``ignore_index`` instead and runs
    the cross-entropy on the upcast logits themselves: the same value, one fp32 logits tensor fewer.
    """
    import torch.nn.functional as F

    upcast = logits.float()
    shifted = upcast[..., :-1, :].contiguous().view(-1, vocab_size)  # the copy the newer loss does without
    targets = labels[..., 1:].contiguous().view(-1).to(shifted.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shifted, targets, ignore_index=ignore_index, reduction="mean")
    total = F.cross_entropy(shifted, targets, ignore_index=ignore_index, reduction="sum")
    if hasattr(num_items_in_batch, "to"):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@contextlib.contextmanager
def loss_for_trace(model, loss_impl: str):
    """``model``'s causal-LM loss replaced for the step by ``loss_impl`` ("current": left as it is).

    transformers' ``*ForCausalLM.forward`` calls ``self.loss_function``; a peft model forwards to its base model,
    whose ``loss_function`` setter (``PreTrainedModel``) is used and undone on exit. "upcast-in-forward" also
    turns the LM head's output to fp32 (a forward hook, removed on exit), as transformers <= 4.45's forward did:
    the loss's own ``.float()`` then copies nothing."""
    if loss_impl == "current":
        yield
        return
    if loss_impl not in ("shifted-copy", "upcast-in-forward"):
        raise TraceError(f"loss_impl must be 'current', 'shifted-copy' or 'upcast-in-forward' (got {loss_impl!r})")
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(lm, "loss_function"):
        raise TraceError(f"{type(lm).__name__} has no loss_function to replace with the {loss_impl} loss")
    head = lm.get_output_embeddings() if loss_impl == "upcast-in-forward" else None
    if loss_impl == "upcast-in-forward" and head is None:
        raise TraceError(f"{type(lm).__name__} has no output embeddings (LM head) to upcast")
    had = "_loss_function" in vars(lm)
    before = vars(lm).get("_loss_function")
    lm.loss_function = legacy_causal_lm_loss
    hook = head.register_forward_hook(lambda module, args, output: output.float()) if head is not None else None
    try:
        yield
    finally:
        if hook is not None:
            hook.remove()
        if had:
            lm._loss_function = before
        else:
            del lm._loss_function


def run_traced_step(model, settings: TraceSettings, *, fake: bool = True) -> SliceTrace:
    """Run forward + loss + backward of ``model`` once and return the segments.

    ``model`` is a meta model from ``build_training_model`` (``fake=True``: it is materialised on fake
    tensors here) or a real CPU model (``fake=False``, used by tests to compare with the real thing).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start_t = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with patched_for_trace(fake), mode, loss_for_trace(model, settings.loss_impl):
        if fake:
            _to_empty_cpu(model)
        model.train()
        tracker = _LiveBytes()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        base = tracker.live
        b, s = settings.batch_size, settings.seq_len
        layers = decoder_layers(model)
        n = len(layers)
        handles = []
        state = {"phase": "forward"}

        def pre_hook(idx):
            def hook(module, args, kwargs):
                if state["phase"] != "forward":
                    return
                tracker.mark("layer", "forward", idx)
                hs = args[0] if args else kwargs.get("hidden_states")
                if idx == 0 and isinstance(hs, torch.Tensor) and hs.requires_grad:
                    hs.register_hook(lambda g: tracker.mark("pre", "backward", None))
            return hook

        def post_hook(idx):
            def hook(module, args, kwargs, output):
                if state["phase"] != "forward":
                    return
                out = output if isinstance(output, torch.Tensor) else output[0]
                if out.requires_grad:
                    out.register_hook(lambda g: tracker.mark("layer", "backward", idx))
                if idx == n - 1:
                    tracker.mark("post", "forward", None)
            return hook

        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(post_hook(i), with_kwargs=True))
        try:
            input_ids = torch.zeros((b, s), dtype=torch.long)
            labels = torch.zeros((b, s), dtype=torch.long)
            tracker.track(input_ids)
            tracker.track(labels)
            ac_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.dtype)
            if settings.weights_16bit and settings.method != "qlora":
                ac_dtype = None  # the weights already are 16-bit: autocast would change nothing
            autocast = (torch.autocast("cpu", dtype=ac_dtype) if ac_dtype is not None
                        else contextlib.nullcontext())
            with tracker:
                tracker.mark("pre", "forward", None)
                with autocast:
                    out = model(input_ids=input_ids, labels=labels)
                    tracker.mark("exit", "forward", None)
                loss = out.loss
                del out
                state["phase"] = "backward"
                tracker.mark("post", "backward", None)
                loss.backward()
                del loss
                tracker.close()
        finally:
            for h in handles:
                h.remove()
    segments = [Segment(**seg) for seg in tracker.segments]
    _check_segments(segments, n)
    return SliceTrace(slice_layers=n, layer_types=layer_kinds(model.config) if hasattr(model, "config") else None,
                      base_bytes=base, segments=segments, seconds=time.perf_counter() - start_t)


def _to_empty_cpu(model) -> None:
    """``model.to_empty(device="cpu")`` (inside a FakeTensorMode): every meta parameter and buffer replaced by an
    uninitialised CPU tensor of its shape, strides and dtype. For the usual contiguous tensor this is ``torch.empty``,
    a factory call, so FakeTensorMode does not first convert the meta argument of ``empty_like`` to a fake tensor
    (a third of the cost of materialising the slice); anything else goes through ``empty_like`` as ``to_empty`` does."""
    import torch

    def empty(t):
        stride, n = [], 1
        for size in reversed(t.shape):
            stride.append(n)
            n *= size
        if t.stride() == tuple(reversed(stride)):
            return torch.empty(t.shape, dtype=t.dtype, layout=t.layout, device="cpu")
        return torch.empty_like(t, device="cpu")

    model._apply(empty)


def _check_segments(segments: list[Segment], n: int) -> None:
    fwd = [(s.name, s.layer) for s in segments if s.phase == "forward"]
    want = [("pre", None)] + [("layer", i) for i in range(n)] + [("post", None), ("exit", None)]
    if fwd != want:
        raise TraceError(f"forward markers out of order: {fwd}")
    bwd_layers = [s.layer for s in segments if s.phase == "backward" and s.name == "layer"]
    if bwd_layers != list(range(n - 1, -1, -1)):
        raise TraceError(f"backward markers out of order: {bwd_layers}")


def extrapolate(trace: SliceTrace, num_layers: int, layer_types: list[str] | None) -> Extrapolated:
    """Replay the slice's segments for a model of ``num_layers`` layers (bytes above the step start)."""
    mapping = layer_map(layer_types, num_layers, trace.slice_layers)
    by_key = {(s.phase, s.name, s.layer): s for s in trace.segments}
    counts = {j: mapping.count(j) for j in range(trace.slice_layers)}
    fwd = [by_key[("forward", "pre", None)]] + [by_key[("forward", "layer", j)] for j in mapping] \
        + [by_key[("forward", "post", None)]]
    bwd = [by_key[("backward", "post", None)]] + [by_key[("backward", "layer", j)] for j in reversed(mapping)]
    if ("backward", "pre", None) in by_key:
        bwd.append(by_key[("backward", "pre", None)])
    live, fwd_peak = 0, 0
    for seg in fwd:
        fwd_peak = max(fwd_peak, live + seg.peak_rel_bytes)
        live += seg.delta_bytes
    # autocast exit frees its cast cache: once per allocation, so per-layer allocations count once per layer
    exit_seg = by_key[("forward", "exit", None)]
    freed = 0
    for label, nbytes in exit_seg.freed_from.items():
        phase, name, layer = label.split(":")
        freed += nbytes * (counts[int(layer)] if name == "layer" else 1)
    live -= freed
    activations = live
    bwd_peak = 0
    for seg in bwd:
        bwd_peak = max(bwd_peak, live + seg.peak_rel_bytes)
        live += seg.delta_bytes
    fwd_flops = sum(s.flops for s in fwd)
    return Extrapolated(activations_bytes=activations, forward_peak_rel_bytes=fwd_peak,
                        backward_peak_rel_bytes=bwd_peak, backward_end_rel_bytes=live,
                        flops=fwd_flops + sum(s.flops for s in bwd), forward_flops=fwd_flops)


# -------------------------------------------------------------------------------------------------- cache


def _key(config_dict: dict, settings: TraceSettings) -> str:
    dumped = settings.model_dump(mode="json")
    if dumped["loss_impl"] == "current":
        del dumped["loss_impl"]  # the default loss keeps the keys traces had before the field existed
    for field in ("checkpoint_reentrant", "bnb_keeps_input"):
        if not dumped[field]:
            del dumped[field]  # likewise: the runner's regime keeps its keys
    blob = json.dumps({"config": config_dict, "settings": dumped,
                       "version": TRACE_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_file(key: str):
    from ftcore.paths import cache_dir

    folder = cache_dir() / "traces"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.json"


_MEMO: dict[str, SliceTrace] = {}


def trace_slice(config, settings: TraceSettings) -> SliceTrace:
    """The traced step of a slice of ``config`` (a ``PretrainedConfig``), from the caches when possible."""
    types = layer_kinds(config)
    n = slice_layer_count(types)
    sliced = slice_config(config, n)
    cfg_dict = sliced.to_dict()
    key = _key(cfg_dict, settings)
    if key in _MEMO:
        return _MEMO[key]
    path = _cache_file(key)
    if path.exists():
        try:
            trace = SliceTrace.model_validate_json(path.read_text())
            _MEMO[key] = trace
            return trace
        except ValueError:
            path.unlink(missing_ok=True)  # a stale or torn cache file: trace again
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    old_level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)  # an op without a fake kernel is reported by our fallback note instead
    try:
        model = build_training_model(sliced, settings)
        trace = run_traced_step(model, settings)
    except EstimatorError:
        raise
    except TraceError:
        raise
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError, KeyError, IndexError,
            AssertionError, ArithmeticError) as exc:
        # unsupported op under fake tensors, data-dependent control flow, a fake kernel's shape assertion
        # (transformers' grouped_mm fallback asserts), ...: the caller notes it and uses the formula
        raise TraceError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        fake_log.setLevel(old_level)
    _MEMO[key] = trace
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # concurrent writers never share one
    tmp.write_text(trace.model_dump_json())
    tmp.replace(path)
    return trace


def trace_settings_key(config, settings: TraceSettings) -> str:
    """The cache key of a trace (for tests and the benchmark)."""
    n = slice_layer_count(layer_kinds(config))
    return _key(slice_config(config, n).to_dict(), settings)


def clear_memory_cache() -> None:
    """Forget in-memory traces (the disk cache stays); used by the benchmark to time a cold estimate."""
    _MEMO.clear()


def describe(trace: SliceTrace) -> list[dict[str, Any]]:
    """Segments as plain rows (for debugging and the benchmark)."""
    return [s.model_dump() for s in trace.segments]
