"""The traced slice of a model: which layers it keeps and which slice layer each full-model layer replays.

Layers of one kind (attention type from ``layer_types``, dense or MoE MLP) run the same ops on the same shapes,
so a slice of layer 0 plus one layer of each other kind stands for any depth: ``slice_config`` builds its
config, ``layer_map`` maps every full-model layer to its slice twin.
"""

from __future__ import annotations

import copy

from estimator.errors import TraceError


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


def layer_kinds(config) -> list[str] | None:
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
    kinds = layer_kinds(config)
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


def decoder_layers(model):
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
