"""Exact parameter counts from the real architecture: meta models, breakdowns, and peft adapters.

Nothing here is a formula: the model is built by transformers on the meta device (no memory, no weights) exactly
as training builds it (``AutoModelForCausalLM``, so the LM head is there), and adapters are counted by applying
the real peft config to that meta model. Counts are numbers of parameters; sizes are bytes.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from estimator.catalog import ModelEntry, config_key, validate_config
from estimator.errors import EstimatorError
from estimator.request import EXPERTS_PRESET, TARGET_PRESETS

MAX_RANK = 1024  # same bound as EstimateRequest.rank; beyond it LoRA stops being low-rank for any catalog model

# Bytes per element of the dtypes an adapter can be saved in, and their safetensors names.
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_SAFETENSORS_DTYPE = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
# safetensors sorts tensors by dtype, larger enum value first (safetensors/src/tensor.rs `prepare`, enum order
# ... F16, BF16, ..., F32 ...), then by name; this is the rank of each dtype in that enum.
_SAFETENSORS_DTYPE_ORDER = {"F16": 7, "BF16": 8, "F32": 11}
# peft's save_pretrained writes this metadata into every adapter_model.safetensors (peft_model.py save_pretrained).
_PEFT_SAFETENSORS_METADATA = {"format": "pt"}


def _torch_dtype(dtype: Any):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise EstimatorError(f"dtype: unknown dtype {dtype!r}; use fp32, bf16 or fp16", field="dtype")
    return names[dtype]


def _as_config_dict(config: Any) -> dict:
    """A plain config dict from a ModelEntry, a dict, or a transformers PretrainedConfig."""
    if isinstance(config, ModelEntry):
        return config.config
    if isinstance(config, dict):
        return validate_config(config)
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):
        return validate_config(config.to_dict(), where=f"{config.model_type} config")
    raise EstimatorError(f"model: expected a catalog entry, a config dict or a PretrainedConfig (got "
                         f"{type(config).__name__})", field="model")


def build_meta_model(config: Any, dtype: Any = None):
    """Build the causal-LM on the meta device (no memory), with tied weights tied.

    ``config`` is a ``ModelEntry``, a config dict or a ``PretrainedConfig``; ``dtype`` defaults to fp32 (the
    dtype the parameter counts and the trainer's master weights use). Parameters AND buffers are on the meta
    device (use ``model.to_empty(device=...)`` to materialise). The result is cached per config contents and
    SHARED: never mutate it (use ``fresh_meta_model`` before applying peft).
    """
    import torch

    data = _as_config_dict(config)
    key = config_key(data)
    return _build_meta_cached(key, json.dumps(data, sort_keys=True), _torch_dtype(dtype or torch.float32))


def fresh_meta_model(config: Any, dtype: Any = None):
    """A private copy of the meta model that the caller may mutate (e.g. wrap with peft)."""
    return copy.deepcopy(build_meta_model(config, dtype))


@functools.lru_cache(maxsize=16)
def _build_meta_cached(key: str, config_json: str, dtype):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from estimator.catalog import _hf_config_cached

    import torch

    hf_config = copy.deepcopy(_hf_config_cached(key, config_json))
    try:
        # torch.device("meta") on top of accelerate's context: buffers (RoPE inv_freq) and GPT-2's Conv1D weights
        # are created on meta directly instead of on CPU first (GPT-3 175B: 9 s -> 0.4 s), and transformers skips
        # its weight init on meta (PreTrainedModel.init_weights). Thread-safe: nothing global is patched by us.
        with init_empty_weights(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:
        raise EstimatorError(
            f"config.json: transformers could not build a {hf_config.model_type} model from this config ({exc}); "
            "check the fields named in the message against the model's published config.json",
            field="config") from exc
    model.tie_weights()  # transformers 5 leaves meta models untied until asked
    model.eval()
    return model


# ------------------------------------------------------------------------------------------------- counting


class ParamBreakdown(BaseModel):
    """Parameter counts by part of the model (tied weights counted once, in ``embeddings``)."""

    model_config = ConfigDict(frozen=True)

    total: int = Field(description="all parameters, tied ones once")
    embeddings: int = Field(description="token (and position) embeddings")
    attention: int = Field(description="attention projections (q, k, v, o and their biases)")
    mlp: int = Field(description="MLP or MoE experts (including the router)")
    norms: int = Field(description="LayerNorm / RMSNorm weights and biases")
    head: int = Field(description="LM head when not tied to the embeddings")
    other: int = Field(description="anything else")
    active: int = Field(description="parameters used per token (MoE: top-k of the experts; dense: total)")
    experts: int = Field(0, description="parameters inside the routed experts (MoE only)")


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


def count_parameters(model) -> ParamBreakdown:
    """Count the parameters of a (meta) model by part; tied weights once, MoE ``active`` with top-k experts."""
    import torch.nn as nn

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
    parts = dict(embeddings=0, attention=0, mlp=0, norms=0, head=0, other=0)
    experts = 0
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            n = param.numel()
            lowered = mod_name.lower()
            if isinstance(module, nn.Embedding):
                parts["embeddings"] += n
            elif id(param) in head_ids:
                parts["head"] += n
            elif _is_norm(module):
                parts["norms"] += n
            elif "attn" in lowered or "attention" in lowered:
                parts["attention"] += n
            elif any(k in lowered for k in ("mlp", "moe", "expert", "feed_forward", "ffn")):
                parts["mlp"] += n
                if re.search(r"(^|\.)experts(\.|$)", mod_name) or mod_name.endswith("experts"):
                    experts += n
            else:
                parts["other"] += n
    total = sum(parts.values())
    active = total
    n_experts, top_k = _moe_sizes(getattr(model, "config", None))
    if experts and n_experts and top_k:
        active = total - experts + experts * top_k // n_experts
    return ParamBreakdown(total=total, active=active, experts=experts, **parts)


def _moe_sizes(config) -> tuple[int | None, int | None]:
    if config is None:
        return None, None
    n = None
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, name, None):
            n = int(getattr(config, name))
            break
    k = getattr(config, "num_experts_per_tok", None) or getattr(config, "top_k", None)
    return n, (int(k) if k else None)


# ------------------------------------------------------------------------------------------------- targets


def _linear_modules(model) -> dict[str, Any]:
    """Full name -> module for every Linear-like layer peft can adapt (nn.Linear, GPT-2's Conv1D), no LM head."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # the per-expert 4-bit Linears the runner swaps in for fused experts (estimator/experts.py) are the experts'
    # storage, not Linears of the architecture: presets resolve the same before and after the swap
    experts = [name + "." for name, module in model.named_modules() if type(module).__name__ == "NF4Experts"]
    return {name: module for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not out_emb and name
            and not any(name.startswith(prefix) for prefix in experts)}


def peft_remapped_names(model) -> set[str]:
    """Target names that peft (0.19+, transformers 5) turns into ``target_parameters`` on fused MoE experts.

    peft's ``convert_peft_config_for_transformers`` maps e.g. ``gate_proj`` / ``up_proj`` / ``down_proj`` of
    Qwen2-MoE-style models (``w1`` / ``w2`` / ``w3`` of Mixtral) onto the fused ``experts.gate_up_proj`` /
    ``experts.down_proj`` parameters (``ParamWrapper``, which needs ``lora_dropout=0``) and drops them as module
    targets, dense and shared-expert MLPs included. Empty for models without fused experts.
    """
    from estimator.experts import fused_experts

    quantized = any(type(m).__name__ == "NF4Experts" for m in model.modules())  # the runner's QLoRA experts
    if not fused_experts(model) and not quantized:
        return set()
    # peft 0.19 added this module (pyproject pins peft>=0.19); imported plainly so a missing module is an error,
    # not a silent "nothing remapped" that would count the dense MLP targets peft really drops.
    from peft.utils import transformers_weight_conversion as conv
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if get_checkpoint_conversion_mapping(model_type) is None:
        return set()
    base = getattr(conv, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    return set(getattr(conv, "_MOE_TARGET_MODULE_MAPPING", {}).get(base, {}))


def _attention_parents(model) -> set[str]:
    return {name for name, module in model.named_modules()
            if "attention" in type(module).__name__.lower() and name}


def linear_names(model) -> list[str]:
    """The distinct short names (last path component) of the model's adaptable Linear layers, sorted."""
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_modules(model)})


# Names of fused or separate q / v projections across architectures (peft's per-model defaults cover most).
_Q_NAMES = ("q_proj", "query", "q", "wq", "q_lin")
_V_NAMES = ("v_proj", "value", "v", "wv", "v_lin")


def resolve_targets(model, targets: str | list[str]) -> list[str]:
    """Module names for peft's ``target_modules``: a preset, or explicit names checked against the model.

    Presets: ``attention-qv`` (query and value projections; fused qkv layers such as GPT-2's ``c_attn`` or
    Phi-3's ``qkv_proj`` where the model has no separate ones), ``attention`` (every Linear inside attention
    blocks), ``all-linear`` (every Linear / Conv1D except the LM head). Names are short names (``q_proj``) or
    dotted suffixes (``attn.c_proj``) and are returned sorted. Unknown names raise ``EstimatorError`` listing the
    model's Linear names.
    """
    linears = _linear_modules(model)
    if not linears:
        raise EstimatorError("targets: this model has no Linear layers peft could adapt", field="targets")
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return _preset(model, linears, targets)
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, (list, tuple)) or not targets:
        raise EstimatorError(f"targets: give a preset ({', '.join(TARGET_PRESETS)}) or module names", field="targets")
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linears)]
    if unknown:
        raise EstimatorError(
            f"targets: {', '.join(map(repr, unknown))} match no Linear layer of this model; its Linear layers are "
            f"{', '.join(linear_names(model))} (or use a preset: {', '.join(TARGET_PRESETS)})", field="targets")
    return sorted(dict.fromkeys(targets))


def expert_target_parameters(model) -> list[str]:
    """peft ``target_parameters`` for the routed experts: ``<module short name>.<3D weight>`` of every fused
    experts module (e.g. ``experts.gate_up_proj``, ``experts.down_proj``), in the module's matrix order; empty
    when the model has none (dense models, or QLoRA's experts already swapped for NF4 Linears)."""
    from estimator.experts import expert_matrices, fused_experts

    out: dict[str, None] = {}
    for name, mod in fused_experts(model):
        for weight, _, _ in expert_matrices(mod):
            out[f"{name.rsplit('.', 1)[-1]}.{weight}"] = None
    return list(out)


def _preset(model, linears: dict[str, Any], preset: str) -> list[str]:
    short = {name: name.rsplit(".", 1)[-1] for name in linears}
    if preset == EXPERTS_PRESET:
        preset = "all-linear"  # the module targets; the experts go in target_parameters (adapter_config)
    if preset == "all-linear":
        # names peft would move onto the fused experts are left out: presets adapt Linear modules only; so are
        # MoE routers built as Linear subclasses (PhiMoE's router returns a tuple a LoRA layer cannot add to)
        routers = {short[n] for n, m in linears.items() if "router" in type(m).__name__.lower()}
        return sorted(set(short.values()) - peft_remapped_names(model) - routers)
    parents = _attention_parents(model)
    in_attn = {name for name in linears if name.rsplit(".", 1)[0] in parents}
    if not in_attn:
        raise EstimatorError(f"targets: preset {preset!r} found no attention Linear layers in this model; give "
                             f"module names from: {', '.join(linear_names(model))}", field="targets")
    attn_short = {short[n] for n in in_attn}
    outside = {short[n] for n in linears if n not in in_attn}
    if preset == "attention":
        # A short name also used outside attention (GPT-2's c_proj in attn and mlp) is qualified by its parent.
        names = set()
        for n in in_attn:
            s = short[n]
            if s in outside:
                names.add(".".join(n.rsplit(".", 2)[-2:]))
            else:
                names.add(s)
        return sorted(names)
    return _qv_names(model, attn_short, outside)


# Multi-head latent attention (DeepSeek-V2/V3, Kimi, GLM-4-MoE-Lite ...): keys and values come from one latent
# projection (kv_a_proj_with_mqa) expanded by kv_b_proj; the query is q_proj, or q_a_proj + q_b_proj with a
# query LoRA rank (transformers' DeepseekV2Attention).
MLA_KV_NAMES = ("kv_a_proj_with_mqa", "kv_b_proj")
MLA_Q_NAMES = (("q_proj",), ("q_a_proj", "q_b_proj"))


def _mla_qv_names(attn_short: set[str]) -> list[str]:
    """attention-qv for MLA: the query and the latent key/value projections ([] when not MLA)."""
    if not set(MLA_KV_NAMES) <= attn_short:
        return []
    for q in MLA_Q_NAMES:
        if set(q) <= attn_short:
            return sorted(set(q) | set(MLA_KV_NAMES))
    return sorted(MLA_KV_NAMES)


def is_mla(targets: list[str]) -> bool:
    """True when resolved targets include MLA's latent key/value projections."""
    return any(t.rsplit(".", 1)[-1] in MLA_KV_NAMES for t in targets)


def _qv_names(model, attn_short: set[str], outside: set[str]) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    default = PEFT_DEFAULTS.get(model_type)
    if isinstance(default, list) and default and set(default) <= attn_short:
        return sorted(default)
    mla = _mla_qv_names(attn_short)
    if mla:
        return mla
    q = [n for n in _Q_NAMES if n in attn_short]
    v = [n for n in _V_NAMES if n in attn_short]
    if q and v:
        return sorted({q[0], v[0]})
    fused = sorted(n for n in attn_short if "qkv" in n.lower() or n in ("c_attn", "query_key_value", "in_proj"))
    if fused:
        return fused
    raise EstimatorError(
        f"targets: could not find query/value projections in this model; give module names from: "
        f"{', '.join(sorted(attn_short))}", field="targets")


# ------------------------------------------------------------------------------------------------- adapters


class AdapterCount(BaseModel):
    """What an adapter adds: trainable parameters and the size of the saved adapter file."""

    model_config = ConfigDict(frozen=True)

    trainable_params: int = Field(description="trainable adapter parameters")
    adapter_bytes: int = Field(description="exact size in bytes of adapter_model.safetensors as peft saves it")
    dtype: str = Field(description="dtype the adapter is saved in (fp32 / bf16 / fp16)")
    targets: list[str] = Field(description="resolved target module names")
    adapted_modules: int = Field(description="number of Linear layers that got an adapter")
    method: str = Field(description="lora / dora / rslora / adalora (as applied)")


def _check_adapter_knobs(rank: int, alpha: float | None, dora: bool, adalora: bool, total_steps: int | None):
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise EstimatorError(f"rank must be between 1 and {MAX_RANK} (got {rank!r})", field="rank")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise EstimatorError(f"alpha must be a positive number (got {alpha!r}); the usual choice is 2 x rank",
                             field="alpha")
    if adalora and dora:
        raise EstimatorError("dora: AdaLoRA and DoRA cannot be combined; choose one", field="dora")
    if adalora and (total_steps is None or isinstance(total_steps, bool) or not isinstance(total_steps, int)
                    or total_steps < 1):
        raise EstimatorError(
            f"total_steps: AdaLoRA needs the total number of training steps (got {total_steps!r}); give a positive "
            "integer", field="total_steps")


def adapter_config(model, *, method: str = "lora", rank: int = 16, alpha: float | None = None,
                   targets: str | list[str] = "attention-qv", dora: bool = False, rslora: bool = False,
                   adalora: bool = False, total_steps: int | None = None, dropout: float = 0.0):
    """The real peft config for these knobs (``LoraConfig`` or ``AdaLoraConfig``), targets resolved on ``model``.

    ``method`` is ``lora`` or ``qlora`` (the adapter is the same; quantization is the estimator's business);
    ``adalora`` / ``dora`` / ``rslora`` are accepted as the method too (same as the flag); ``full`` has no
    adapter and raises. ``alpha`` defaults to 2 x rank. AdaLoRA starts at ``init_r = rank`` and
    prunes to ``target_r = ceil(2/3 rank)`` (peft's default ratio 12 -> 8) over ``total_steps``.
    """
    from peft import AdaLoraConfig, LoraConfig

    if method in ("adalora", "dora", "rslora"):  # the adapter kind given as the method: same as its flag
        adalora, dora, rslora = adalora or method == "adalora", dora or method == "dora", rslora or method == "rslora"
    elif method not in ("lora", "qlora"):
        raise EstimatorError(f"method: adapters exist for lora and qlora, not {method!r}", field="method")
    _check_adapter_knobs(rank, alpha, dora, adalora, total_steps)
    names = resolve_targets(model, targets)
    lora_alpha = float(alpha) if alpha is not None else 2.0 * rank
    fan_in_fan_out = _uses_conv1d(model, names)
    experts = experts_targets(model, targets, method=method, dora=dora, adalora=adalora, dropout=dropout)
    if adalora:
        return AdaLoraConfig(init_r=rank, target_r=max(1, math.ceil(rank * 2 / 3)), lora_alpha=lora_alpha,
                             target_modules=names, total_step=total_steps, lora_dropout=dropout,
                             fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM")
    return LoraConfig(r=rank, lora_alpha=lora_alpha, target_modules=names, lora_dropout=dropout,
                      use_dora=dora, use_rslora=rslora, fan_in_fan_out=fan_in_fan_out, task_type="CAUSAL_LM",
                      **({"target_parameters": experts} if experts else {}))


def experts_targets(model, targets, *, method: str, dora: bool = False, adalora: bool = False,
                    dropout: float = 0.0) -> list[str]:
    """``target_parameters`` for ``targets`` (only the ``all-linear+experts`` preset has any), with what peft's
    ``ParamWrapper`` refuses named: lora_dropout (it cannot factor x out of B(A(dropout(x)))), DoRA and AdaLoRA
    (LoRA layers only), QLoRA (the runner stores the experts as NF4 Linears, not 3D weights)."""
    if targets != EXPERTS_PRESET:
        return []
    if any(type(m).__name__ == "NF4Experts" for m in model.modules()):
        method = "qlora"  # the runner's QLoRA experts
    check_experts_knobs(method=method, dora=dora, adalora=adalora, dropout=dropout)
    names = expert_target_parameters(model)
    if not names:
        raise EstimatorError(f"targets: {EXPERTS_PRESET}: this model has no fused routed experts; use all-linear",
                             field="targets")
    return names


def check_experts_knobs(*, method: str, dora: bool = False, adalora: bool = False, dropout: float = 0.0) -> None:
    """What the ``all-linear+experts`` preset cannot be combined with, as a named error (see ``experts_targets``)."""
    field = "targets"
    if method == "qlora":
        raise EstimatorError(f"targets: {EXPERTS_PRESET} adapts the fused 16-bit experts; QLoRA stores them as "
                             "NF4 Linears: use method lora, or the all-linear preset", field=field)
    if dora or adalora:
        raise EstimatorError(f"targets: {EXPERTS_PRESET} adapts expert weights with peft's ParamWrapper, which "
                             "has no DoRA or AdaLoRA: turn DoRA / AdaLoRA off, or use all-linear", field=field)
    if dropout:
        raise EstimatorError(f"targets: {EXPERTS_PRESET} needs lora_dropout 0 (peft's ParamWrapper cannot apply "
                             f"dropout; got {dropout:g}): set dropout to 0", field="dropout")


def _uses_conv1d(model, names: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in names)
               for n, m in _linear_modules(model).items())


def apply_adapter(config: Any, **knobs):
    """A fresh meta model wrapped with the real peft adapter for ``knobs`` (see ``adapter_config``)."""
    import warnings

    from peft import get_peft_model

    import torch

    model = fresh_meta_model(config)
    peft_config = adapter_config(model, **knobs)
    # torch.device("meta"): peft creates the adapter matrices directly on meta instead of allocating and
    # initialising them on CPU first (405B all-linear: tens of seconds of uniform_/zero_ on CPU otherwise).
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # fan_in_fan_out and meta-device notices
        peft_model = get_peft_model(model, peft_config)
    # AdaLoRA's ranknum is a frozen Parameter (peft adalora/layer.py); moving it to the meta device re-creates it
    # with requires_grad=True, which a real model never has. Restore what peft does on a real device.
    for module in peft_model.modules():
        ranknum = getattr(module, "ranknum", None)
        if ranknum is not None and hasattr(ranknum, "values"):
            for param in ranknum.values():
                param.requires_grad_(False)
    return peft_model


def count_adapter(model_entry_or_config: Any, *, method: str = "lora", rank: int = 16, alpha: float | None = None,
                  targets: str | list[str] = "attention-qv", dora: bool = False, rslora: bool = False,
                  adalora: bool = False, total_steps: int | None = None, adapter_dtype: str = "fp32",
                  dropout: float = 0.0) -> AdapterCount:
    """Trainable parameters and saved-file bytes of an adapter, by applying the real peft config on meta.

    ``adapter_dtype`` is the dtype the adapter is saved in: fp32 by default, because peft keeps adapter weights
    in fp32 even when the base runs in bf16 (``autocast_adapter_dtype=True``), and that is what the runner saves.
    Cached per (config, knobs).
    """
    if adapter_dtype not in _DTYPE_BYTES:
        raise EstimatorError(f"adapter_dtype: use fp32, bf16 or fp16 (got {adapter_dtype!r})", field="adapter_dtype")
    if method in ("adalora", "dora", "rslora"):  # the adapter kind given as the method: same as its flag
        adalora, dora, rslora = adalora or method == "adalora", dora or method == "dora", rslora or method == "rslora"
        method = "lora"
    data = _as_config_dict(model_entry_or_config)
    tkey = targets if isinstance(targets, str) else tuple(targets)
    return _count_adapter_cached(config_key(data), json.dumps(data, sort_keys=True), method, rank,
                                 None if alpha is None else float(alpha), tkey, bool(dora), bool(rslora),
                                 bool(adalora), total_steps, adapter_dtype, float(dropout))


# Layers in the slice that peft is applied to when the decoder stack is homogeneous: two, so that a test can see
# layer 0 and layer 1 get identical adapters before the count is multiplied out (REFERENCE.md: per-layer figures
# are linear in the layer count; 405B all-linear on the full meta model costs seconds of peft bookkeeping).
SLICE_LAYERS = 2


def layer_stack(model) -> tuple[str, int] | None:
    """Module path and length of the model's repeated decoder-layer ``ModuleList`` (None when not found)."""
    import torch.nn as nn

    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not n:
        return None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, n
    return None


def _layer_signature(layer) -> tuple:
    return tuple((name, type(module).__name__,
                  tuple((p_name, tuple(p.shape)) for p_name, p in module.named_parameters(recurse=False)))
                 for name, module in layer.named_modules())


def is_homogeneous(model) -> bool:
    """True when every decoder layer has the same module tree and parameter shapes (so layers can be sliced)."""
    stack = layer_stack(model)
    if stack is None:
        return False
    layers = model.get_submodule(stack[0])
    first = _layer_signature(layers[0])
    return all(_layer_signature(layer) == first for layer in layers[1:])


def slice_config(config: Any, num_layers: int) -> dict:
    """A copy of the config dict with only ``num_layers`` decoder layers (per-layer lists truncated)."""
    from estimator.catalog import _SIZE_FIELDS

    data = dict(_as_config_dict(config))
    aliases = [name for name in _SIZE_FIELDS["num_hidden_layers"][0] if name in data]
    if not aliases:
        raise EstimatorError("config.json: field num_hidden_layers is missing", field="num_hidden_layers")
    for name in aliases:
        data[name] = num_layers
    for name in ("layer_types",):
        if isinstance(data.get(name), list):
            data[name] = data[name][:num_layers]
    return data


def _count_on(peft_model) -> tuple[dict[str, int], dict[str, tuple[int, ...]], list[str], Any]:
    from peft.utils.save_and_load import get_peft_model_state_dict

    trainable = {name: p.numel() for name, p in peft_model.named_parameters() if p.requires_grad}
    shapes = {name: tuple(t.shape) for name, t in get_peft_model_state_dict(peft_model).items()}
    adapted = [name for name, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    return trainable, shapes, adapted, peft_model.peft_config["default"]


@functools.lru_cache(maxsize=128)
def _count_adapter_cached(key, config_json, method, rank, alpha, targets, dora, rslora, adalora, total_steps,
                          adapter_dtype, dropout) -> AdapterCount:
    config = json.loads(config_json)
    knobs = dict(method=method, rank=rank, alpha=alpha, targets=list(targets) if isinstance(targets, tuple)
                 else targets, dora=dora, rslora=rslora, adalora=adalora, total_steps=total_steps, dropout=dropout)
    full = build_meta_model(config)
    stack = layer_stack(full)
    if stack is not None and stack[1] > SLICE_LAYERS and is_homogeneous(full):
        resolve_targets(full, knobs["targets"])  # validate the names on the real model first
        trainable, shapes, adapted, peft_cfg = _count_on(apply_adapter(slice_config(config, SLICE_LAYERS), **knobs))
        trainable, shapes, adapted = _expand_layers(stack, trainable, shapes, adapted)
    else:
        trainable, shapes, adapted, peft_cfg = _count_on(apply_adapter(config, **knobs))
    kind = "adalora" if adalora else "dora" if dora else "rslora" if rslora else "lora"
    target_modules = peft_cfg.target_modules
    return AdapterCount(
        trainable_params=sum(trainable.values()),
        adapter_bytes=safetensors_file_bytes(shapes, adapter_dtype, metadata=_PEFT_SAFETENSORS_METADATA),
        dtype=adapter_dtype,
        targets=[target_modules] if isinstance(target_modules, str) else sorted(target_modules),
        adapted_modules=len(adapted),
        method=kind,
    )


def _expand_layers(stack: tuple[str, int], trainable: dict, shapes: dict, adapted: list):
    """Turn counts from a SLICE_LAYERS slice into the full stack: layer 0's entries repeated for every layer."""
    path, n_layers = stack
    pattern = re.compile(r"(^|\.)" + re.escape(path) + r"\.(\d+)\.")

    def expand(names):
        out, first, second = [], [], []
        for name in names:
            match = pattern.search(name)
            if match is None:
                out.append((name, name))
            elif match.group(2) == "0":
                first.append(name)
            else:
                second.append(name)
        if len(first) != len(second) and second:
            raise AssertionError("slice layers differ; cannot extrapolate")  # is_homogeneous rules this out
        for name in first:
            match = pattern.search(name)
            start, end = match.span(2)
            for i in range(n_layers):
                out.append((name, name[:start] + str(i) + name[end:]))
        return out

    new_trainable = {new: trainable[old] for old, new in expand(trainable)}
    new_shapes = {new: shapes[old] for old, new in expand(shapes)}
    new_adapted = [new for _, new in expand(adapted)]
    return new_trainable, new_shapes, new_adapted


def safetensors_file_bytes(shapes: dict[str, tuple[int, ...]], dtype: str = "fp32",
                           metadata: dict[str, str] | None = None) -> int:
    """Exact size in bytes of a safetensors file holding tensors of these shapes, all in ``dtype``.

    Reproduces the format (safetensors/src/tensor.rs): 8-byte little-endian header length, a compact JSON header
    (``__metadata__`` first, then tensors in storage order: dtype descending, then name) padded with spaces to a
    multiple of 8 bytes, then the raw tensor bytes.
    """
    st_dtype = _SAFETENSORS_DTYPE[dtype]
    itemsize = _DTYPE_BYTES[dtype]
    order = sorted(shapes, key=lambda n: (-_SAFETENSORS_DTYPE_ORDER[st_dtype], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in order:
        nbytes = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset
