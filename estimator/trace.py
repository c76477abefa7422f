"""Traced activations: one real training step of a 2-layer slice of the real architecture, on fake tensors.

How (see ``shared/REFERENCE.md``, "Memory of one training step"):

1. The model is the real transformers architecture with ``num_hidden_layers`` cut to 2, or, when layers differ
   (sliding/full attention of any ratio such as Gemma-2's 1:1 or Gemma-3's 5:1, dense layers before MoE ones as
   in DeepSeek or Qwen-MoE), to layer 0 plus one layer of each other kind (``slice_config``), built on the meta
   device with the real peft
   adapter, then materialised with ``to_empty(device="cpu")`` inside ``FakeTensorMode`` so that no byte is
   allocated. QLoRA's frozen Linears are replaced by a module that stores exactly what bitsandbytes stores
   (NF4 + double quantization) and runs the same ops as bitsandbytes' training path on CUDA
   (dequantize to the compute dtype, ``F.linear``, save only the packed weight for backward).
2. A ``TorchDispatchMode`` (``_LiveBytes``) sees every tensor an op creates, keeps a weak reference to its
   storage and so knows the live bytes after every op; the same mode counts FLOPs with PyTorch's own
   ``torch.utils.flop_counter.flop_registry``.
3. Markers (forward pre-hooks of each decoder layer, gradient hooks on each layer's output) cut the step
   into segments: pre, layer 0, layer 1, post (forward), then the same backwards. For each segment we keep
   the change in live bytes, the peak above its start and its FLOPs.
4. The full model's step is the slice's segments replayed, each layer after the first by its slice twin of the
   same kind (exact: layers of one kind run the same ops on the same shapes). MoE experts run in transformers'
   grouped layout, whose tensors are sized by tokens x top_k whatever the routing (``estimator/experts.py``). ``extrapolate`` returns activations held at
   the end of the forward pass, the forward/backward peak above the weights, and the FLOPs of one micro-step.

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
import copy
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from estimator.errors import EstimatorError

# bitsandbytes' CPU backend logs a warning about an optional kernels package at import (peft imports it);
# nothing here runs bitsandbytes kernels, so keep the CLI output clean.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TRACE_VERSION = 7  # bump when the trace changes meaning: old disk caches are ignored (6: LoRA base_dtype; 7: MoE)

# bitsandbytes NF4 with double quantization (Dettmers et al. 2023; bitsandbytes 0.50 storage, measured
# exact in shared/REFERENCE.md): 64 weights per block, 256 blocks per nested block.
NF4_BLOCK = 64
NF4_NESTED_BLOCK = 256
NF4_CODE_BYTES = 16 * 4  # the 16-entry NF4 code table, fp32
NF4_OFFSET_BYTES = 4  # the fp32 mean subtracted from the 8-bit absmax
NF4_NESTED_CODE_BYTES = 256 * 4  # the 256-entry dynamic code of the nested quantization, fp32


class TraceError(Exception):
    """The architecture could not be traced (the caller falls back to a formula and says so)."""


def nf4_linear_bytes(n: int) -> int:
    """Bytes bitsandbytes stores for one NF4, double-quantized Linear weight of ``n`` elements.

    packed 4-bit weight + uint8 absmax per 64 + fp32 nested absmax per 256 blocks + code tables and offset
    (REFERENCE.md: 4096x4096 -> 8,655,940 B).
    """
    blocks = math.ceil(n / NF4_BLOCK)
    return (math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCK)
            + NF4_CODE_BYTES + NF4_OFFSET_BYTES + NF4_NESTED_CODE_BYTES)


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


def _flop_registry():
    from torch.utils.flop_counter import flop_registry

    return flop_registry


class _LiveBytes:
    """TorchDispatchMode factory: live storage bytes after every op, segment peaks and FLOPs."""

    def __new__(cls, *args, **kwargs):  # built lazily so that importing this module does not import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class LiveBytes(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live = 0
                self._seen: dict[int, weakref.ref] = {}
                self.segments: list[dict] = []
                self._cur: dict | None = None
                self._registry = _flop_registry()

            # -- storages
            def track(self, t) -> None:
                import torch

                if not isinstance(t, torch.Tensor):
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

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                from torch.utils._pytree import tree_flatten

                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    self.track(t)
                cur = self._cur
                if cur is not None:
                    if self.live > cur["peak"]:
                        cur["peak"] = self.live
                    formula = self._registry.get(func._overloadpacket)
                    if formula is not None:
                        cur["flops"] += int(formula(*args, **kwargs, out_val=out))
                    else:
                        cur["flops"] += _grouped_flops(func, args, out)
                return out

        return LiveBytes(*args, **kwargs)


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


def slice_layer_count(layer_types: list[str] | None) -> int:
    """Layers of the traced slice: 2 when all layers are alike, else layer 0 plus one layer of each kind that
    layers 1.. have (so that every full-model layer after the first has a twin in the slice)."""
    if layer_types and len(set(layer_types)) > 1:
        return len(_slice_kinds(layer_types))
    return 2


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _routed_experts(config) -> int:
    for name in ("n_routed_experts", "num_experts", "num_local_experts"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _mlp_kinds(config, n_layers: int) -> list[str] | None:
    """"dense" / "moe" per layer for stacks that mix them, as the modeling files decide it: DeepSeek-V2/V3,
    GLM-4-MoE, dots1 (``layer_idx >= first_k_dense_replace``), Qwen2/3-MoE (``mlp_only_layers``,
    ``decoder_sparse_step``), or an explicit ``mlp_layer_types``."""
    explicit = getattr(config, "mlp_layer_types", None)
    if explicit:
        return [str(k) for k in explicit][:n_layers]
    experts = _routed_experts(config)
    first_dense = getattr(config, "first_k_dense_replace", None)
    if isinstance(first_dense, int) and experts:
        return ["moe" if i >= first_dense else "dense" for i in range(n_layers)]
    if experts and (hasattr(config, "mlp_only_layers") or hasattr(config, "decoder_sparse_step")):
        only = set(getattr(config, "mlp_only_layers", None) or [])
        step = getattr(config, "decoder_sparse_step", None) or 1
        return ["moe" if i not in only and (i + 1) % step == 0 else "dense" for i in range(n_layers)]
    return None


def _layer_types(config) -> list[str] | None:
    """The kind of every decoder layer (attention type from ``layer_types`` and dense/MoE MLP, joined by
    "+"), or None when all layers are alike. Layers of one kind run the same ops on the same shapes."""
    n = _num_layers(config)
    attn = getattr(config, "layer_types", None)
    attn = [str(t) for t in attn][:n] if attn else None
    mlp = _mlp_kinds(config, n)
    if mlp is not None and len(set(mlp)) == 1 and not attn:
        return None
    if attn and mlp:
        kinds = [f"{a}+{m}" for a, m in zip(attn, mlp)]
    else:
        kinds = attn or mlp
    return list(kinds) if kinds else None


def _slice_kinds(kinds: list[str]) -> list[str]:
    """Layer 0's kind, then each kind of layers 1.. once (first appearance; dense MLPs before MoE ones, the
    order every dense-then-MoE stack builds them in)."""
    rest: list[str] = []
    for k in kinds[1:]:
        if k not in rest:
            rest.append(k)
    rest.sort(key=lambda k: k.endswith("moe"))  # stable: first appearance within dense / within MoE
    return [kinds[0]] + rest


def slice_config(config, n_layers: int):
    """A copy of ``config`` with ``n_layers`` decoder layers and no KV cache.

    When the layers differ (hybrid sliding/full attention of any ratio, dense layers before MoE ones) and
    ``n_layers`` is the slice size, the slice holds layer 0 and one layer of each other kind: ``layer_types``,
    ``first_k_dense_replace`` or ``mlp_only_layers`` are rewritten to build exactly those layers. Otherwise the
    first ``n_layers`` layers are kept.
    """
    cfg = copy.deepcopy(config)
    kinds = _layer_types(config)
    attn = getattr(config, "layer_types", None)
    mlp = _mlp_kinds(config, _num_layers(config))
    chosen = None
    if kinds and len(set(kinds)) > 1 and len(_slice_kinds(kinds)) == n_layers < _num_layers(config):
        chosen = _slice_kinds(kinds)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(cfg, name, None), int):
            setattr(cfg, name, n_layers)
    if chosen is None:
        if attn:
            cfg.layer_types = list(attn)[:n_layers]
        if getattr(config, "mlp_layer_types", None):
            cfg.mlp_layer_types = list(config.mlp_layer_types)[:n_layers]
    else:
        picked = [0] + [kinds.index(k, 1) for k in chosen[1:]]  # a real layer of each kind
        if attn:
            cfg.layer_types = [attn[i] for i in picked]
        if mlp is not None:
            slice_mlp = [mlp[i] for i in picked]
            if getattr(config, "mlp_layer_types", None):
                cfg.mlp_layer_types = slice_mlp
            elif isinstance(getattr(config, "first_k_dense_replace", None), int):
                cfg.first_k_dense_replace = slice_mlp.count("dense")
            else:
                cfg.mlp_only_layers = [i for i, m in enumerate(slice_mlp) if m == "dense"]
                cfg.decoder_sparse_step = 1
    cfg.use_cache = False
    return cfg


def layer_map(layer_types: list[str] | None, num_layers: int, slice_layers: int) -> list[int]:
    """For each layer of the full model, the slice layer whose segments it replays."""
    if not layer_types or len(set(layer_types)) == 1:
        return [0] + [1] * (num_layers - 1)
    if slice_layers == len(_slice_kinds(layer_types)):
        slice_types = _slice_kinds(layer_types)
    else:
        slice_types = layer_types[:slice_layers]
    out = [0]
    for i in range(1, num_layers):
        matches = [j for j in range(1, slice_layers) if slice_types[j] == layer_types[i]]
        if not matches:
            raise TraceError(f"layer type {layer_types[i]!r} of layer {i} is not in the traced slice")
        out.append(matches[0])
    return out


def _decoder_layers(model):
    """The ModuleList of decoder layers of a (peft-wrapped) causal LM."""
    import torch

    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0 and name.split(".")[-1] in ("layers", "h", "blocks"):
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise TraceError("could not find the decoder layers (a ModuleList named layers / h / blocks)")
    return best[1]


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
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
        _quantize_frozen_linears(peft_model, settings)
        _quantize_fused_experts(peft_model, settings)
    return peft_model


def _quantize_fused_experts(peft_model, settings: TraceSettings) -> None:
    """QLoRA's routed experts as the runner stores them (``runner/train/experts.py``): ``NF4Experts`` with one NF4
    stand-in Linear per expert and matrix, its token-expert pairs split evenly over the experts."""
    import torch

    from estimator.experts import balanced_split, replace_fused_experts

    compute = torch.float16 if settings.dtype == "fp16" else torch.bfloat16
    replace_fused_experts(peft_model, lambda d_in, d_out, _w: _nf4_cls()(d_in, d_out, None, compute),
                          split=lambda ids, experts: balanced_split(ids.numel(), experts))


def _norms_to_fp32(model) -> None:
    """The QLoRA paper's regime (artidoro/qlora ``qlora.py``): modules whose name holds ``norm`` in fp32, the
    rest of the non-quantized weights in the compute dtype; ``runner.train.recipe`` does the same (same rule)."""
    import torch

    for name, module in model.named_modules():
        if "norm" in name:
            module.to(torch.float32)


def _quantize_frozen_linears(peft_model, settings: TraceSettings) -> None:
    """Swap every frozen ``nn.Linear`` (not the LM head) for an NF4 stand-in, wrapped as peft wraps bnb layers."""
    import torch
    from peft.tuners.lora import bnb as lora_bnb

    compute = torch.float16 if settings.dtype == "fp16" else torch.bfloat16
    head = peft_model.get_output_embeddings() if hasattr(peft_model, "get_output_embeddings") else None
    for name, mod in list(peft_model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is not torch.nn.Linear or child is head or child_name.startswith("lora_"):
                continue
            if child.weight.requires_grad:
                continue
            setattr(mod, child_name, _nf4_linear(child, compute))
    for mod in peft_model.modules():
        if type(mod).__name__ == "Linear" and hasattr(mod, "lora_A") and isinstance(mod.base_layer, _nf4_cls()):
            mod.__class__ = lora_bnb.Linear4bit


@functools.lru_cache(maxsize=1)
def _nf4_cls():
    import torch

    class _Dequant4bitMatmul(torch.autograd.Function):
        """bitsandbytes 0.50 ``MatMul4Bit`` on CUDA for training-size inputs: dequantize, ``F.linear``; saves
        only the packed weight and dequantizes again for the input gradient."""

        @staticmethod
        def forward(ctx, x, packed, absmax8, offset, shape, dtype):
            w = _dequant(absmax8, offset, shape, dtype)
            ctx.save_for_backward(packed, absmax8, offset)
            ctx.shape = shape
            return torch.nn.functional.linear(x, w)

        @staticmethod
        def backward(ctx, grad):
            packed, absmax8, offset = ctx.saved_tensors
            w = _dequant(absmax8, offset, ctx.shape, grad.dtype)
            return torch.matmul(grad, w), None, None, None, None, None

    def _dequant(absmax8, offset, shape, dtype):
        # bitsandbytes' default gemm_4bit path: dequantize_blockwise(absmax8) -> fp32 per 64-block, + offset
        # (a second fp32 tensor), then dequantize_4bit -> the weight in the compute dtype (values do not matter)
        scales = torch.empty(absmax8.shape, dtype=torch.float32, device=absmax8.device) + offset
        w = torch.empty(shape, dtype=dtype, device=absmax8.device)
        del scales
        return w

    class NF4Linear(torch.nn.Module):
        """Frozen Linear stored as bitsandbytes stores NF4 + double quantization; forward as ``Linear4bit``."""

        def __init__(self, in_features, out_features, bias, compute_dtype):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            n = in_features * out_features
            blocks = math.ceil(n / NF4_BLOCK)
            self.compute_dtype = compute_dtype
            meta = torch.device("meta")
            self.weight = torch.nn.Parameter(torch.empty(math.ceil(n / 2), 1, dtype=torch.uint8, device=meta),
                                             requires_grad=False)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=meta))
            self.register_buffer("nested_absmax", torch.empty(math.ceil(blocks / NF4_NESTED_BLOCK),
                                                              dtype=torch.float32, device=meta))
            self.register_buffer("code", torch.empty(16, dtype=torch.float32, device=meta))
            self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=meta))
            self.register_buffer("nested_code", torch.empty(256, dtype=torch.float32, device=meta))
            self.bias = bias

        @property
        def W_q(self):  # noqa: N802 - peft's dequantize_module_weight calls ``dequantize()`` when this exists
            return self.weight

        def dequantize(self):
            """What DoRA's weight norm gets from bitsandbytes' ``dequantize_4bit``: the full weight in the dtype
            it was loaded in (fp32 for the runner), after an fp32 absmax temporary."""
            scales = torch.empty(self.absmax.shape, dtype=torch.float32, device=self.absmax.device) + self.offset
            w = torch.empty((self.out_features, self.in_features), dtype=torch.float32, device=self.absmax.device)
            del scales
            return w

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            out = _Dequant4bitMatmul.apply(x, self.weight, self.absmax, self.offset,
                                           (self.out_features, self.in_features), self.compute_dtype)
            if bias is not None:
                out = out + bias
            return out.to(inp_dtype)

    return NF4Linear


def _nf4_linear(linear, compute_dtype):
    bias = linear.bias
    if bias is not None:
        bias.requires_grad_(False)
    return _nf4_cls()(linear.in_features, linear.out_features, bias, compute_dtype)


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
    try:
        from transformers.integrations import moe
    except ImportError:  # a transformers without the experts interface: nothing to patch
        yield
        return
    import torch

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


_TRACE_LOCK = threading.Lock()  # the packed-sequence and grouped_mm patches are process-global


def run_traced_step(model, settings: TraceSettings, *, fake: bool = True) -> SliceTrace:
    """Run forward + loss + backward of ``model`` once and return the segments.

    ``model`` is a meta model from ``build_training_model`` (``fake=True``: it is materialised on fake
    tensors here) or a real CPU model (``fake=False``, used by tests to compare with the real thing).
    """
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start_t = time.perf_counter()
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    grouped = _fake_friendly_grouped_mm() if fake else contextlib.nullcontext()
    with _TRACE_LOCK, _no_packed_sequence_detection(), grouped, mode:
        if fake:
            model.to_empty(device="cpu")
        model.train()
        tracker = _LiveBytes()
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        base = tracker.live
        b, s = settings.batch_size, settings.seq_len
        layers = _decoder_layers(model)
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
    return SliceTrace(slice_layers=n, layer_types=_layer_types(model.config) if hasattr(model, "config") else None,
                      base_bytes=base, segments=segments, seconds=time.perf_counter() - start_t)


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
    blob = json.dumps({"config": config_dict, "settings": settings.model_dump(mode="json"),
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
    types = _layer_types(config)
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
    n = slice_layer_count(_layer_types(config))
    return _key(slice_config(config, n).to_dict(), settings)


def clear_memory_cache() -> None:
    """Forget in-memory traces (the disk cache stays); used by the benchmark to time a cold estimate."""
    _MEMO.clear()


def describe(trace: SliceTrace) -> list[dict[str, Any]]:
    """Segments as plain rows (for debugging and the benchmark)."""
    return [s.model_dump() for s in trace.segments]
