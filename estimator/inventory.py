"""The inventory of an estimate: every parameter as trained, read from the meta model of the traced slice.

``build_inventory`` lists base tensors (frozen or not, NF4 for QLoRA) and adapter tensors for the full depth,
``param_breakdown`` counts the full model's parameters by part from the same slice, ``adapter_file_bytes`` sizes
the adapter file peft saves.
"""

from __future__ import annotations

import re
from typing import Any

from estimator.errors import EstimatorError
from estimator.memory import Inventory, TensorInfo
from estimator.request import EXPERTS_PRESET, EstimateRequest
from estimator.slicing import decoder_layers, layer_kinds, layer_map, slice_config, slice_layer_count

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def _layer_of(name: str) -> int | None:
    m = _LAYER_RE.search("." + name)
    return int(m.group(1)) if m else None


def _matches(name: str, targets: list[str]) -> bool:
    """peft's rule for a list of target names: the module name equals one or ends with ``.`` + one."""
    return any(name == t or name.endswith("." + t) for t in targets)


def build_inventory(entry, req: EstimateRequest) -> tuple[Inventory, Any, list[str]]:
    """Every parameter as trained: base (frozen or not, NF4 for QLoRA) + adapter tensors.

    Read from the meta model of the traced slice (2 or 3 layers) and replicated for the other layers (each
    layer after the first has the same tensors as its slice twin), so a 405B estimate never builds 126 layers.
    Adapter shapes follow peft's LoRA layer (``lora_A``: r x in, ``lora_B``: out x r, DoRA magnitude: out,
    AdaLoRA ``lora_E``: r x 1); ``tests/test_estimate.py`` checks the counts against the full meta model and
    ``params.count_adapter`` (the real peft on meta).
    Returns the inventory, the slice meta model and the resolved target names.
    """
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    from estimator.experts import expert_matrices, fused_experts, num_experts
    from estimator.params import build_meta_model, resolve_targets

    config = entry.hf_config()
    num_layers = _num_layers(config)
    types = layer_kinds(config)
    n_slice = min(slice_layer_count(types), num_layers)
    model = build_meta_model(slice_config(config, n_slice))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets: list[str] = []
    if req.method != "full":
        targets = resolve_targets(model, req.targets if isinstance(req.targets, str) else list(req.targets))
    tensors: list[TensorInfo] = []
    seen: set[int] = set()
    trainable_base = req.method == "full"
    # QLoRA: fused experts are stored as one NF4 Linear per expert and matrix (runner/train/experts.py NF4Experts)
    nf4_experts = set()
    if req.method == "qlora":
        from estimator.experts import unsupported_reason

        nf4_experts = {id(m) for _, m in fused_experts(model) if unsupported_reason(m) is None}
    lora_experts: set[int] = set()
    if req.method != "full" and req.targets == EXPERTS_PRESET:
        lora_experts = {id(m) for _, m in fused_experts(model)}
        if not lora_experts:
            raise EstimatorError(f"targets: {EXPERTS_PRESET}: this model has no fused routed experts; use "
                                 "all-linear", field="targets")
    for mod_name, module in model.named_modules():
        is_linear = isinstance(module, (nn.Linear, Conv1D)) and module is not head and bool(mod_name)
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if id(module) in nf4_experts and p.ndim == 3:
                tensors.extend(TensorInfo(name=f"{full}.{e}", shape=tuple(p.shape[1:]), trainable=False,
                                          quantized=True, layer=_layer_of(full)) for e in range(p.shape[0]))
                continue
            quant = req.method == "qlora" and is_linear and p_name == "weight"
            tensors.append(TensorInfo(name=full, shape=tuple(p.shape), trainable=trainable_base, quantized=quant,
                                      layer=_layer_of(full)))
        if is_linear and req.method != "full" and _matches(mod_name, targets):
            if isinstance(module, Conv1D):
                d_in, d_out = module.weight.shape
            else:
                d_out, d_in = module.weight.shape
            layer = _layer_of(mod_name + ".")
            r = req.rank
            # AdaLoRA keeps A, B, E in ParameterDicts: peft saves them without the ".weight" suffix
            suffix = "" if req.adalora else ".weight"
            tensors.append(TensorInfo(name=f"{mod_name}.lora_A{suffix}", shape=(r, d_in), trainable=True, layer=layer,
                                      adapter=True))
            tensors.append(TensorInfo(name=f"{mod_name}.lora_B{suffix}", shape=(d_out, r), trainable=True, layer=layer,
                                      adapter=True))
            if req.adalora:
                tensors.append(TensorInfo(name=f"{mod_name}.lora_E", shape=(r, 1), trainable=True, layer=layer,
                                          adapter=True))
                tensors.append(TensorInfo(name=f"{mod_name}.ranknum", shape=(1,), trainable=False, layer=layer,
                                          adapter=True))
            if req.dora:
                tensors.append(TensorInfo(name=f"{mod_name}.lora_magnitude_vector", shape=(d_out,), trainable=True,
                                          layer=layer, adapter=True))
        if id(module) in lora_experts:
            # peft ParamWrapper per targeted 3D weight (the all-linear+experts preset): lora_A (r x experts, in),
            # lora_B (out, r x experts); each later target wraps the earlier wrapper, so the first sits deepest
            mats = expert_matrices(module)
            n_exp, r = num_experts(module), req.rank
            for i, (_, d_in, d_out) in enumerate(mats):
                prefix = f"{mod_name}." + "base_layer." * (len(mats) - 1 - i)
                layer = _layer_of(mod_name + ".")
                tensors.append(TensorInfo(name=f"{prefix}lora_A.weight", shape=(r * n_exp, d_in), trainable=True,
                                          layer=layer, adapter=True))
                tensors.append(TensorInfo(name=f"{prefix}lora_B.weight", shape=(d_out, r * n_exp), trainable=True,
                                          layer=layer, adapter=True))
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    mapping = layer_map(types, num_layers, n_slice)
    # buffers inside a layer (DeepSeek-V3's router e_score_correction_bias) repeat with the layer
    layer_buffers: dict[int, int] = {}
    for b_name, b in model.named_buffers():
        if _layer_of(b_name) is not None:
            layer_buffers[_layer_of(b_name)] = layer_buffers.get(_layer_of(b_name), 0) + b.numel() * b.element_size()
    buffer_bytes += sum(layer_buffers.get(mapping[i], 0) for i in range(n_slice, num_layers))
    by_layer: dict[int, list[TensorInfo]] = {}
    for t in tensors:
        if t.layer is not None:
            by_layer.setdefault(t.layer, []).append(t)
    for i in range(n_slice, num_layers):
        j = mapping[i]
        for t in by_layer.get(j, []):
            name = _LAYER_RE.sub(lambda m: m.group(0).replace(f".{j}.", f".{i}."), "." + t.name, count=1)[1:]
            tensors.append(t.model_copy(update={"name": name, "layer": i}))
    return Inventory(tensors=tensors, buffer_bytes=buffer_bytes, num_layers=num_layers), model, targets


def param_breakdown(model, config, num_layers: int):
    """``ParamBreakdown`` of the full model from its slice: slice counts + the replicated layers' counts."""
    from estimator.params import ParamBreakdown, _moe_sizes, count_parameters

    sliced = count_parameters(model)
    layers = decoder_layers(model)
    n_slice = len(layers)
    fields = ("total", "embeddings", "attention", "mlp", "norms", "head", "other", "experts")
    counts = {f: getattr(sliced, f) for f in fields}
    per_layer = [count_parameters(layer) for layer in layers]
    for j in layer_map(layer_kinds(config), num_layers, n_slice)[n_slice:]:
        for f in fields:
            counts[f] += getattr(per_layer[j], f)
    n_exp, top_k = _moe_sizes(config)
    active = counts["total"]
    if counts["experts"] and n_exp and top_k:
        active = counts["total"] - counts["experts"] + counts["experts"] * top_k // n_exp
    return ParamBreakdown(active=active, **counts)


def _num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise EstimatorError("config.json: num_hidden_layers is missing; add the model's layer count", field="config")


def adapter_file_bytes(inv: Inventory, targets: list[str]) -> int:
    """Size of ``adapter_model.safetensors`` as peft saves it (fp32 adapter weights, peft's key names)."""
    from estimator.params import safetensors_file_bytes

    shapes = {}
    for t in inv.tensors:
        if ".lora_" in t.name or t.name.endswith(".ranknum"):
            if t.name.endswith(".ranknum"):
                continue  # AdaLoRA's rank counter is not saved
            shapes["base_model.model." + t.name] = t.shape
    return safetensors_file_bytes(shapes, "fp32", metadata={"format": "pt"})

