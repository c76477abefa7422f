"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv:2410.21228), measured on the weights a run really produced.

Definition (the paper's Definition 1): a singular vector ``y_j`` of the fine-tuned weight matrix is an *intruder
dimension* when ``max_i |cos(y_j, x_i)| < epsilon`` over every singular vector ``x_i`` of the pre-trained matrix.
The paper looks at the highest-ranking singular vectors of the tuned matrix (``INTRUDER_TOP_K``) and shows
counts for a range of thresholds. Singular vectors are the left ones (columns of U, the output space of a
``Linear`` whose weight is ``(out, in)``); the cosine is taken in absolute value because an SVD fixes a singular
vector only up to its sign.

Everything is read from files, one module at a time: the base weight from the model folder's safetensors and
the update from the adapter's ``lora_A`` / ``lora_B`` (plus DoRA's magnitude vector), or the tuned weight from a
full run's ``model/`` folder. So it costs two SVDs per adapted module and never loads a model: SmolLM2-135M's 120
attention modules (576 x 576 and 192 x 576) took 29 s on this project's shared, busy 2-core machine (measured).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, Field

from runner.errors import RunnerError

#: Top singular vectors of the tuned weight that are checked. The paper counts intruders among the 10
#: highest-ranking singular vectors of each fine-tuned matrix (arXiv:2410.21228, section 4, "top 10").
INTRUDER_TOP_K = 10
#: Similarity threshold epsilon. The paper sweeps epsilon and reports counts for thresholds around 0.5-0.6; a
#: public reproduction (himanii777/LoRA-Intruder-Dimensions) uses 0.6. 0.5 is the stricter, common choice here.
INTRUDER_EPSILON = 0.5
#: Most modules analysed per model (evenly spaced over the adapted modules): bounds the CPU time of a 7B-70B
#: run's report; every module is analysed below this number.
INTRUDER_MAX_MODULES = 256
#: peft's prefix of adapter tensor names (``base_model.model.<module>.lora_A.weight``).
PEFT_PREFIX = "base_model.model."


class ModuleIntruders(BaseModel):
    """One adapted module: how many of the tuned weight's top-k singular vectors are intruders."""

    module: str = Field(description="module name, e.g. model.layers.0.self_attn.q_proj")
    shape: list[int] = Field(description="weight shape (out, in)")
    intruders: int = Field(description="top-k singular vectors of the tuned weight with max |cos| < epsilon")
    max_cos: list[float] = Field(description="for each of the top-k tuned singular vectors: max |cos| to any "
                                             "singular vector of the base weight (1.0 = unchanged direction)")
    delta_norm_ratio: float = Field(description="||W_tuned - W|| / ||W|| (Frobenius)")


class IntruderSummary(BaseModel):
    modules: int = Field(description="modules analysed")
    modules_total: int = Field(description="modules the adapter (or the full run) changed")
    total: int = Field(description="intruder dimensions summed over the analysed modules")
    mean_per_module: float
    modules_with_intruders: int
    seconds: float = Field(description="wall time of the analysis, seconds")


class IntruderReport(BaseModel):
    """What ``report.json["intruder_dimensions"]`` holds."""

    source: str = Field(description="lora (base + adapter update) or full (tuned weights vs base weights)")
    top_k: int = INTRUDER_TOP_K
    epsilon: float = INTRUDER_EPSILON
    reference: str = "Shuttleworth et al. 2024, arXiv:2410.21228, Definition 1"
    summary: IntruderSummary
    per_module: list[ModuleIntruders]


# ------------------------------------------------------------------------------------------------- the math


def count_intruders(base_weight, tuned_weight, top_k: int = INTRUDER_TOP_K,
                    epsilon: float = INTRUDER_EPSILON) -> tuple[int, list[float]]:
    """(number of intruders, max |cos| per top-k tuned singular vector) for one weight matrix (2-D tensors).

    Computed in float32 on the CPU (``torch.linalg.svd``; float64 gave the same counts and the same lowest max |cos|,
    0.988, on the SmolLM2 demo adapter's 120 modules); ``base_weight`` and ``tuned_weight`` have the same shape ``(out, in)``.
    """
    import torch

    w0 = base_weight.detach().to("cpu", torch.float32)
    w1 = tuned_weight.detach().to("cpu", torch.float32)
    if w0.shape != w1.shape or w0.dim() != 2:
        raise ValueError(f"weights must be two matrices of one shape (got {tuple(w0.shape)}, {tuple(w1.shape)})")
    u0 = torch.linalg.svd(w0, full_matrices=False).U  # (out, min(out, in)) base singular vectors
    u1 = torch.linalg.svd(w1, full_matrices=False).U[:, :top_k]  # top-k of the tuned weight
    cos = (u1.T @ u0).abs()  # unit vectors: the dot product is the cosine
    best = cos.max(dim=1).values
    return int((best < epsilon).sum()), [round(float(b), 4) for b in best]


# ---------------------------------------------------------------------------------------------- file readers


class _Weights:
    """Lazy reader of a safetensors model folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {k: self.folder / v for k, v in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise RunnerError(f"no safetensors weights in {self.folder}", field="model",
                                  fix="pass a model folder saved with save_pretrained(safe_serialization=True)")
            from safetensors import safe_open

            self.files = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    self.files.update({k: f for k in h.keys()})

    def keys(self) -> list[str]:
        return list(self.files)

    def get(self, key: str):
        from safetensors import safe_open

        if key not in self.files:
            raise RunnerError(f"weight {key} is not in {self.folder}", field="base",
                              fix="use the base model the adapter was trained on")
        with safe_open(str(self.files[key]), framework="pt") as h:
            return h.get_tensor(key)


def _pick(names: list[str], limit: int) -> list[str]:
    if len(names) <= limit:
        return names
    step = len(names) / limit
    return [names[int(i * step)] for i in range(limit)]


def _module_order(module: str) -> tuple[int, str]:
    """Layer 2 before layer 10: by layer number, then by name."""
    layer = layer_of(module)
    return (-1 if layer is None else layer, module)


def _lora_scale(cfg: dict, module: str) -> float:
    """alpha / r (alpha / sqrt(r) with rsLoRA), with peft's per-module rank_pattern / alpha_pattern."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    for key, value in (cfg.get("rank_pattern") or {}).items():
        if module.endswith(key):
            r = value
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if module.endswith(key):
            alpha = value
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def tuned_from_adapter(base_w, tensors: dict, cfg: dict, module: str):
    """W + delta W for one module, from the adapter's tensors (fp32): LoRA / rsLoRA ``W + s * B @ A``; DoRA
    rescales each output row of ``W + s * B @ A`` to the learned magnitude (peft's merge, row norms)."""
    import torch

    a = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].to(torch.float32)
    b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].to(torch.float32)
    delta = b @ a
    if cfg.get("fan_in_fan_out"):  # GPT-2's Conv1D stores W as (in, out); peft transposes delta W to match
        delta = delta.T
    if delta.shape != base_w.shape:
        raise RunnerError(f"adapter of {module} has shape {tuple(delta.shape)}, the base weight {tuple(base_w.shape)}",
                          field="adapter", fix="pass the base model this adapter was trained on")
    w = base_w.to(torch.float32) + _lora_scale(cfg, module) * delta
    mag = tensors.get(f"{PEFT_PREFIX}{module}.lora_magnitude_vector")
    if mag is None:
        mag = tensors.get(f"{PEFT_PREFIX}{module}.lora_magnitude_vector.weight")
    if mag is not None:
        w = w * (mag.to(torch.float32) / torch.linalg.norm(w, dim=1)).view(-1, 1)
    return w


def adapter_intruders(base_dir: str | Path, adapter_dir: str | Path, top_k: int = INTRUDER_TOP_K,
                      epsilon: float = INTRUDER_EPSILON, max_modules: int = INTRUDER_MAX_MODULES) -> IntruderReport:
    """Intruder dimensions of every module a LoRA / rsLoRA / DoRA / QLoRA adapter changes.

    ``base_dir``: the base model folder (its full-precision safetensors: a QLoRA adapter is compared against the
    unquantized weights it was trained from). ``adapter_dir``: adapter_config.json + adapter_model.safetensors.
    """
    import time

    from safetensors.torch import load_file

    from runner.tools.adapters import check_adapter_dir
    from runner.models import resolve_model_dir

    start = time.perf_counter()
    adapter_dir = check_adapter_dir(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type", "LORA") != "LORA":
        raise RunnerError(f"intruder dimensions are measured for LoRA-type adapters (got {cfg.get('peft_type')})",
                          field="adapter", fix="pass a LoRA, rsLoRA, DoRA or QLoRA adapter")
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = sorted((k.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for k in tensors
                      if k.endswith(".lora_A.weight")), key=_module_order)
    base = _Weights(resolve_model_dir(str(base_dir)))
    rows = []
    for module in _pick(modules, max_modules):
        w0 = base.get(f"{module}.weight")
        w1 = tuned_from_adapter(w0, tensors, cfg, module)
        rows.append(_row(module, w0, w1, top_k, epsilon))
    return _report("lora", rows, len(modules), top_k, epsilon, time.perf_counter() - start)


def full_intruders(base_dir: str | Path, tuned_dir: str | Path, module_suffixes: list[str] | None = None,
                   top_k: int = INTRUDER_TOP_K, epsilon: float = INTRUDER_EPSILON,
                   max_modules: int = INTRUDER_MAX_MODULES) -> IntruderReport:
    """The same count for a fully fine-tuned model: tuned weights vs base weights of the same modules.

    ``module_suffixes``: module names to compare (e.g. ``["q_proj", "v_proj"]``, what a LoRA run would adapt);
    None compares every 2-D weight inside the transformer blocks (embeddings and the LM head excluded).
    """
    import time

    from runner.models import resolve_model_dir

    start = time.perf_counter()
    base = _Weights(resolve_model_dir(str(base_dir)))
    tuned = _Weights(Path(tuned_dir))
    keys = set(tuned.keys())
    modules = []
    for key in base.keys():
        if not key.endswith(".weight") or key not in keys or ".layers." not in key:
            continue
        module = key.removesuffix(".weight")
        if module_suffixes and not any(module.endswith(s) for s in module_suffixes):
            continue
        modules.append(module)
    modules.sort(key=_module_order)
    rows = []
    for module in _pick(modules, max_modules):
        w0, w1 = base.get(f"{module}.weight"), tuned.get(f"{module}.weight")
        if w0.dim() != 2:
            continue
        rows.append(_row(module, w0, w1, top_k, epsilon))
    return _report("full", rows, len(modules), top_k, epsilon, time.perf_counter() - start)


def _row(module: str, w0, w1, top_k: int, epsilon: float) -> ModuleIntruders:
    import torch

    n, best = count_intruders(w0, w1, top_k, epsilon)
    w0f, w1f = w0.to(torch.float64), w1.to(torch.float64)
    ratio = float(torch.linalg.norm(w1f - w0f) / torch.linalg.norm(w0f)) if w0f.abs().sum() else 0.0
    return ModuleIntruders(module=module, shape=list(w0.shape), intruders=n, max_cos=best,
                           delta_norm_ratio=round(ratio, 6))


def _report(source: str, rows: list[ModuleIntruders], total_modules: int, top_k: int, epsilon: float,
            seconds: float) -> IntruderReport:
    total = sum(r.intruders for r in rows)
    summary = IntruderSummary(modules=len(rows), modules_total=total_modules, total=total,
                              mean_per_module=round(total / len(rows), 4) if rows else 0.0,
                              modules_with_intruders=sum(1 for r in rows if r.intruders),
                              seconds=round(seconds, 3))
    return IntruderReport(source=source, top_k=top_k, epsilon=epsilon, summary=summary, per_module=rows)


def layer_of(module: str) -> int | None:
    """Layer index of a module name (``model.layers.12.self_attn.q_proj`` -> 12), None when there is none."""
    parts = module.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def per_layer(report: IntruderReport | None) -> dict[int, int]:
    """``{layer: intruders}`` summed over the modules of each layer, from a report.json ``intruder_dimensions``."""
    out: dict[int, int] = {}
    for row in report.per_module if report else []:
        layer = layer_of(row.module)
        if layer is not None:
            out[layer] = out.get(layer, 0) + row.intruders
    return out


def layer_min_cos(report: IntruderReport | None) -> dict[int, float]:
    """``{layer: lowest max |cos|}`` over the top-k tuned singular vectors of the layer's analysed modules: 1.0 when
    the tuned top directions are the base's own, below epsilon where an intruder is."""
    out: dict[int, float] = {}
    for row in report.per_module if report else []:
        layer = layer_of(row.module)
        if layer is not None and row.max_cos:
            out[layer] = min(out.get(layer, 1.0), min(row.max_cos))
    return out
