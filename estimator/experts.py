"""MoE experts as transformers 5 builds them, and their 4-bit storage for QLoRA.

transformers 5 stores the routed experts of Mixtral, Qwen2/3-MoE, OLMoE, PhiMoE, DeepSeek-V2/V3, ... fused
into two 3D parameters per layer (``gate_up_proj``: experts x 2I x h, ``down_proj``: experts x h x I, in
classes decorated with ``integrations.moe.use_experts_implementation``). bitsandbytes' loader replaces only
``nn.Linear`` modules (``integrations/bitsandbytes.py replace_with_bnb_linear``), so a ``load_in_4bit`` load
leaves those 3D tensors unquantized in the load dtype (a real CPU load of a tiny Mixtral:
``experts.gate_up_proj`` float32, every attention Linear ``Params4bit``); for Mixtral-8x7B that is 45 of its
46.7B parameters. Only Llama-4's experts are unfused for bitsandbytes
(``quantizers/base.py MODULES_TO_PATCH_FOR_QUANTIZATION``).

``NF4Experts`` is the module the runner swaps in to make QLoRA quantize the experts for real: one
bitsandbytes ``Linear4bit`` per expert and matrix (NF4, double quantization), fed in transformers' grouped
layout (token-expert pairs sorted by expert, each expert's rows run through its two Linears). The estimator
traces the same module with its NF4 stand-in Linears. Every tensor of that layout is sized by
tokens x top_k split over the experts, so the activation bytes do not depend on how tokens are routed; the
trace splits them evenly (``balanced_split``) because fake tensors carry no routing.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

#: Weight names of a fused experts module: the gated up projection (or the plain one) and the down one.
FUSED_UP = ("gate_up_proj", "up_proj")
FUSED_DOWN = "down_proj"
#: Attribute of a fused experts module holding ``{weight name: [one 4-bit Linear per expert]}`` quantized while
#: loading (``runner/train/experts.py quantize_experts_while_loading``); ``NF4Experts`` takes them as they are.
PREQUANTIZED = "_nf4_prequantized"


def fused_experts(model) -> list[tuple[str, object]]:
    """``(name, module)`` of every fused experts module (3D expert weights) in ``model``."""
    out = []
    for name, mod in model.named_modules():
        up = next((getattr(mod, n) for n in FUSED_UP if _is_3d(getattr(mod, n, None))), None)
        if up is not None and _is_3d(getattr(mod, FUSED_DOWN, None)) and hasattr(mod, "has_gate"):
            out.append((name, mod))
    return out


def _is_3d(p) -> bool:
    return p is not None and getattr(p, "ndim", 0) == 3


def unsupported_reason(mod) -> str | None:
    """Why ``NF4Experts`` cannot stand in for this experts module (None when it can)."""
    if getattr(mod, "has_bias", False):
        return "its experts have biases"
    if getattr(mod, "has_post_expert_norm", False):
        return "its experts have a post-expert norm"
    if not getattr(mod, "is_concatenated", True):
        return "its gate and up weights are interleaved"
    return None


def expert_matrices(mod) -> list[tuple[str, int, int]]:
    """``(weight name, in_features, out_features)`` of one expert's matrices, as Linears would hold them."""
    out = []
    for name in FUSED_UP + (FUSED_DOWN,):
        p = getattr(mod, name, None)
        if not _is_3d(p):
            continue
        a, b = p.shape[1], p.shape[2]
        # stored (experts, out, in); transposed layouts store (experts, in, out)
        d_in, d_out = (a, b) if getattr(mod, "is_transposed", False) else (b, a)
        out.append((name, d_in, d_out))
    return out


def quantize_fused_tensor(mod, weight, make_linear: Callable) -> list:
    """One ``make_linear(in_features, out_features, weight_2d)`` per expert of the fused tensor ``weight`` of
    ``mod`` (its ``gate_up_proj``/``up_proj`` or ``down_proj``, stored (experts, out, in), or (experts, in, out)
    when ``mod.is_transposed``)."""
    a, b = weight.shape[1], weight.shape[2]
    transposed = bool(getattr(mod, "is_transposed", False))
    d_in, d_out = (a, b) if transposed else (b, a)
    return [make_linear(d_in, d_out, weight[e].t() if transposed else weight[e]) for e in range(weight.shape[0])]


def num_experts(mod) -> int:
    return next(getattr(mod, n) for n in FUSED_UP if _is_3d(getattr(mod, n, None))).shape[0]


@functools.lru_cache(maxsize=None)
def checkpoint_layout(model_type: str) -> dict[str, tuple[tuple, bool]]:
    """How a checkpoint of ``model_type`` stores each fused expert weight: ``{name: (sort key, per expert)}``.

    transformers' loader reads the checkpoint's tensors in natural key order (``core_model_loading.dot_natural_key``)
    and fuses per-expert ones with the model type's ``WeightConverter`` (``conversion_mapping``: Mixtral's
    ``experts.*.w1/w3`` stacked and concatenated into ``gate_up_proj``, ``experts.*.w2`` stacked into
    ``down_proj``; Qwen-MoE's ``experts.*.down_proj`` sorts before its ``gate_proj``/``up_proj``). The sort key is
    that of the first source key from ``experts`` on; per expert is True when a converter fuses it while loading.
    A weight no converter targets is stored fused under its own name. Cached: do not change the dict returned."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    layout = {name: (natural_key(f"experts.{name}"), False) for name in FUSED_UP + (FUSED_DOWN,)}
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        if not isinstance(conv, WeightConverter):
            continue
        for target in conv.target_patterns:
            name = target.rpartition(".")[2]
            if name in layout and ".experts." in "." + target:
                first = conv.source_patterns[0].replace("*", "0")
                layout[name] = (natural_key(first[first.find("experts"):]), True)
    return layout


def natural_key(key: str) -> tuple:
    """transformers' ``dot_natural_key`` (the order its loader reads a checkpoint in): numbers sort as numbers,
    before names."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in key.split("."))


def balanced_split(total: int, experts: int) -> list[int]:
    """``total`` token-expert pairs spread evenly over ``experts`` (the first ``total % experts`` get one more)."""
    base, extra = divmod(total, experts)
    return [base + (1 if e < extra else 0) for e in range(experts)]


def _nf4_experts_cls():
    import torch

    class NF4Experts(torch.nn.Module):
        """Routed experts with one 4-bit Linear per expert and matrix, run in transformers' grouped layout.

        ``forward(hidden_states (T, h), top_k_index (T, k), top_k_weights (T, k)) -> (T, h)``, the signature of
        the fused experts modules. ``split`` maps (sorted expert ids, number of pairs) to rows per expert:
        the real counts in a run, ``balanced_split`` in the trace.
        """

        def __init__(self, fused, make_linear: Callable, split: Callable | None = None):
            super().__init__()
            self.num_experts = num_experts(fused)
            self.has_gate = bool(getattr(fused, "has_gate", True))
            self.act_fn = fused.act_fn
            self._fused_cls = type(fused)
            self.config = getattr(fused, "config", None)
            self.weight_names = [m[0] for m in expert_matrices(fused)]
            up_name = self.weight_names[0]
            done = getattr(fused, PREQUANTIZED, {})  # quantized while loading: the fused tensors are meta

            def linears(name):
                return done[name] if name in done else quantize_fused_tensor(fused, getattr(fused, name), make_linear)

            self.up = torch.nn.ModuleList(linears(up_name))
            self.down = torch.nn.ModuleList(linears(FUSED_DOWN))
            self.split = split or _bincount_split

        def _gate(self, x):
            if self.has_gate:
                return self._fused_cls._apply_gate(self, x)  # act(gate) * up, or the model's own gating
            return self.act_fn(x)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            k = top_k_index.size(-1)
            n_tokens, hidden = hidden_states.shape
            ids, perm = torch.sort(top_k_index.reshape(-1))
            rows = hidden_states[perm // k]
            weights = top_k_weights.reshape(-1)[perm]
            outs = []
            for e, chunk in enumerate(torch.split(rows, self.split(ids, self.num_experts))):
                if chunk.shape[0] == 0:
                    continue
                outs.append(self.down[e](self._gate(self.up[e](chunk))))
            out = torch.cat(outs) * weights.unsqueeze(-1).to(outs[0].dtype)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel(), device=perm.device)
            out = out[inverse].view(n_tokens, k, hidden).sum(dim=1)
            return out.to(hidden_states.dtype)

    return NF4Experts


def _bincount_split(ids, experts: int) -> list[int]:
    import torch

    return torch.bincount(ids, minlength=experts).tolist()


_CLS = None


def nf4_experts_class():
    """The ``NF4Experts`` class (built lazily: importing this module does not import torch)."""
    global _CLS
    if _CLS is None:
        _CLS = _nf4_experts_cls()
    return _CLS


def replace_fused_experts(model, make_linear: Callable, split: Callable | None = None) -> tuple[int, list[str]]:
    """Swap every supported fused experts module of ``model`` for ``NF4Experts``.

    ``make_linear(in_features, out_features, weight_2d)`` builds one expert matrix's 4-bit Linear. Returns the
    number of modules swapped and a reason for each one left as it was.
    """
    cls = nf4_experts_class()
    swapped, skipped = 0, []
    for name, mod in fused_experts(model):
        reason = unsupported_reason(mod)
        if reason:
            skipped.append(f"{name}: {reason}")
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, cls(mod, make_linear, split))
        swapped += 1
    return swapped, skipped


def expert_weight_count(model) -> int:
    """Parameters inside fused experts (all experts, both matrices)."""
    return sum(math.prod(getattr(mod, n).shape) for _, mod in fused_experts(model)
               for n, _, _ in expert_matrices(mod))
