"""Model and GPU catalogs, and turning what the user typed into a validated model entry.

Models: ``data/models/catalog.yaml`` (id -> display name, published parameter count, hub id, source) plus one
published HF ``config.json`` per id in ``data/models/<id>/``. A model can also be given as a path to a
``config.json``, a local model folder, or (online only) a hub id. Every config is checked for absurd or
missing sizes before anything is built from it, so a bad file gives an ``EstimatorError`` naming the field,
never a traceback or a multi-minute build.

GPUs: ``data/gpus.csv`` (memory in GiB, dense peak FLOP/s in TFLOP/s, bandwidth in GB/s, USD per GPU-hour),
loaded into ``GPU`` objects whose fields carry SI units (bytes, FLOP/s, bytes/s).
"""

from __future__ import annotations

import csv
import difflib
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from estimator.errors import EstimatorError
from ftcore.paths import data_path

MODELS_DIR = data_path("models")
CATALOG_FILE = MODELS_DIR / "catalog.yaml"
GPUS_FILE = data_path("gpus.csv")

# Limits on a config's sizes, checked before building a meta model. The largest published dense models stay far
# below them (Llama-3.1-405B: 126 layers, hidden 16,384, vocab 128,256; Gemma-2: vocab 256,000), so anything beyond
# is a typo or a hostile file. The layer limit also bounds the meta build time (about 8 ms per layer on 2 cores).
MAX_LAYERS = 1_000
MAX_HIDDEN = 1_000_000
MAX_VOCAB = 10_000_000
MAX_HEADS = 100_000
MAX_INTERMEDIATE = 10_000_000
MAX_EXPERTS = 10_000
MAX_POSITIONS = 100_000_000
# A rough dense size check (12 * L * h^2 + 2 * V * h) above 100 trillion parameters is refused: 250x the largest
# published dense model (Llama-3.1-405B), so no real config reaches it, and building it would be pointless.
MAX_ROUGH_PARAMS = 100 * 10**12

# Size fields under the names different architectures use (HF attribute_map aliases), checked in the raw JSON.
_SIZE_FIELDS: dict[str, tuple[tuple[str, ...], int]] = {
    "num_hidden_layers": (("num_hidden_layers", "n_layer", "num_layers", "n_layers"), MAX_LAYERS),
    "hidden_size": (("hidden_size", "n_embd", "d_model", "dim"), MAX_HIDDEN),
    "num_attention_heads": (("num_attention_heads", "n_head", "num_heads", "n_heads"), MAX_HEADS),
    "vocab_size": (("vocab_size", "padded_vocab_size"), MAX_VOCAB),
}
_OPTIONAL_SIZE_FIELDS: dict[str, int] = {
    "intermediate_size": MAX_INTERMEDIATE,
    "n_inner": MAX_INTERMEDIATE,
    "ffn_dim": MAX_INTERMEDIATE,
    "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_HIDDEN,
    "num_local_experts": MAX_EXPERTS,
    "num_experts": MAX_EXPERTS,
    "n_routed_experts": MAX_EXPERTS,
    "num_experts_per_tok": MAX_EXPERTS,
    "moe_intermediate_size": MAX_INTERMEDIATE,
    "max_position_embeddings": MAX_POSITIONS,
    "n_positions": MAX_POSITIONS,
}


class ModelEntry(BaseModel):
    """One model the estimator can work on: its HF config plus catalog facts."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="catalog id, or the path / hub id the model was given as")
    display_name: str = Field(description="human-readable name")
    config: dict[str, Any] = Field(description="the HF config.json contents")
    published_params: int | None = Field(None, description="published total parameter count (catalog only)")
    hub_id: str | None = Field(None, description="Hugging Face hub id")
    source: Literal["catalog", "path", "hub"] = Field(description="where the entry came from")
    params_source: str | None = Field(None, description="where published_params comes from")
    published_params_exact: bool = Field(True, description="False when the published figure is rounded (GPT-3)")

    def __hash__(self) -> int:  # the config dict is not hashable; its canonical hash stands for it
        return hash((self.id, self.source, self.config_key))

    @property
    def config_key(self) -> str:
        """A stable hash of the config contents (the key of every cache built on this model)."""
        return config_key(self.config)

    def hf_config(self):
        """The ``transformers.PretrainedConfig`` for this model (cached per config contents; do not mutate)."""
        return _hf_config_cached(self.config_key, json.dumps(self.config, sort_keys=True))

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))


def config_key(config: dict) -> str:
    """SHA-256 (hex, 16 chars) of a config dict's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=256)
def _hf_config_cached(key: str, config_json: str):
    from transformers import AutoConfig

    config = dict(json.loads(config_json))
    model_type = config.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **config)
    except (ValueError, TypeError, KeyError) as exc:
        raise EstimatorError(
            f"config.json: transformers could not read this {model_type} config ({exc}); fix the named field",
            field="config",
        ) from exc


# ----------------------------------------------------------------------------------------------- validation


def _known_model_types() -> tuple[set[str], set[str]]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return set(CONFIG_MAPPING_NAMES), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(config: Any, where: str = "config.json") -> dict:
    """Check a config dict before anything is built from it; return it unchanged.

    Raises ``EstimatorError`` naming the field and the fix for: not a JSON object, missing or unknown
    ``model_type``, a model type without a causal-LM head, missing layer/hidden/head/vocab sizes, sizes that are
    not positive integers or beyond the ``MAX_*`` limits, heads that do not divide the hidden size (unless
    ``head_dim`` is given), KV heads that do not divide the heads, and top-k above the expert count.
    """
    if not isinstance(config, dict):
        raise EstimatorError(f"{where}: expected a JSON object with the model's config, got {type(config).__name__}",
                             field="config")
    if "text_config" in config and not any(k in config for k in _SIZE_FIELDS["hidden_size"][0]):
        raise EstimatorError(
            f"{where}: this is a multimodal config (it has text_config); give the text model's config.json instead",
            field="text_config")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise EstimatorError(
            f"{where}: field model_type is missing; add it (e.g. \"model_type\": \"llama\") as in the model's "
            "published config.json", field="model_type")
    known, causal = _known_model_types()
    if model_type not in known:
        close = difflib.get_close_matches(model_type, sorted(known), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise EstimatorError(
            f"{where}: model_type {model_type!r} is not known to the installed transformers{hint}. "
            "Fix the model_type field (custom remote code is not run).", field="model_type")
    if model_type not in causal:
        raise EstimatorError(
            f"{where}: model_type {model_type!r} has no causal-LM head in transformers; give a decoder "
            "(causal language model) config", field="model_type")

    values: dict[str, int] = {}
    for canonical, (aliases, limit) in _SIZE_FIELDS.items():
        present = [name for name in aliases if name in config and config[name] is not None]
        if not present:
            raise EstimatorError(
                f"{where}: field {canonical} is missing (also looked for {', '.join(aliases[1:])}); copy it from "
                "the model's published config.json", field=canonical)
        name = present[0]
        values[canonical] = _check_size(config[name], name, limit, where)
    for name, limit in _OPTIONAL_SIZE_FIELDS.items():
        if config.get(name) is not None:
            values[name] = _check_size(config[name], name, limit, where)

    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    if "head_dim" not in values and hidden % heads:
        raise EstimatorError(
            f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}; fix one of them or "
            "give head_dim explicitly", field="num_attention_heads")
    kv = values.get("num_key_value_heads")
    if kv is not None and heads % kv:
        raise EstimatorError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}; fix "
            "num_key_value_heads", field="num_key_value_heads")
    experts = values.get("num_local_experts") or values.get("num_experts") or values.get("n_routed_experts")
    top_k = values.get("num_experts_per_tok")
    if experts and top_k and top_k > experts:
        raise EstimatorError(
            f"{where}: num_experts_per_tok {top_k} is larger than the number of experts {experts}; fix "
            "num_experts_per_tok", field="num_experts_per_tok")
    layers, vocab = values["num_hidden_layers"], values["vocab_size"]
    width = max(values.get("intermediate_size", 0), 4 * hidden)
    rough = layers * (4 * hidden * hidden + 3 * hidden * width) * max(experts or 1, 1) + 2 * vocab * hidden
    if rough > MAX_ROUGH_PARAMS:
        raise EstimatorError(
            f"{where}: these sizes describe about {rough:.2e} parameters (num_hidden_layers={layers}, "
            f"hidden_size={hidden}, vocab_size={vocab}), far beyond any real model; fix the sizes",
            field="hidden_size")
    return config


def _check_size(value: Any, name: str, limit: int, where: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not _is_int(value):
        raise EstimatorError(f"{where}: field {name} must be a positive integer (got {value!r}); fix {name}",
                             field=name)
    if value <= 0:
        raise EstimatorError(f"{where}: field {name} must be positive (got {value}); fix {name}", field=name)
    if value > limit:
        raise EstimatorError(
            f"{where}: field {name} = {value:,} is beyond any real model (limit {limit:,}); fix {name}", field=name)
    return value


# ------------------------------------------------------------------------------------------------ the catalog


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, ModelEntry]:
    import yaml

    with open(CATALOG_FILE, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    entries = {}
    for model_id, facts in raw.items():
        config_path = MODELS_DIR / model_id / "config.json"
        # Shipped configs are validated by tests/test_catalog.py (test_shipped_configs_validate); skipping
        # validate_config here keeps listing the catalog free of the transformers import (the app's pickers).
        config = _read_json(config_path)
        entries[model_id] = ModelEntry(
            id=model_id,
            display_name=facts["display_name"],
            config=config,
            published_params=facts.get("published_params"),
            hub_id=facts.get("hub_id"),
            source="catalog",
            params_source=facts.get("source"),
            published_params_exact=not facts.get("published_params_rounded", False),
        )
    return entries


def list_models() -> list[ModelEntry]:
    """Every catalog model, sorted by id."""
    return [entry for _, entry in sorted(_catalog().items())]


def model_ids() -> list[str]:
    """The catalog ids, sorted."""
    return sorted(_catalog())


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise EstimatorError(f"{path}: cannot read it ({exc.strerror}); give a readable config.json", field="model") \
            from exc
    except UnicodeDecodeError as exc:
        raise EstimatorError(f"{path}: not a UTF-8 text file; give a config.json", field="model") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EstimatorError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); fix the file or "
            "download it again (it may be truncated)", field="model") from exc


def _close_matches(ref: str) -> list[str]:
    catalog = _catalog()
    names = {mid: mid for mid in catalog}
    names.update({e.hub_id.lower(): mid for mid, e in catalog.items() if e.hub_id})
    names.update({e.display_name.lower(): mid for mid, e in catalog.items()})
    hits = difflib.get_close_matches(ref.lower(), list(names), n=8, cutoff=0.5)
    out: list[str] = []
    for hit in hits:
        if names[hit] not in out:
            out.append(names[hit])
    return out[:5]


def _suggest(ref: str) -> str:
    close = _close_matches(ref)
    if close:
        return "close catalog matches: " + ", ".join(close)
    return "see `ftadvisor models` for the catalog ids"


# Seconds to wait for a TCP connection to the hub before calling it offline (a DNS failure returns at once; without
# this probe huggingface_hub retries five times with backoff, about 25 s, before failing).
HUB_PROBE_TIMEOUT_S = 3.0


def _offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return any(str(f).strip().lower() in {"1", "true", "yes", "on"} for f in flags if f)


def _hub_reachable() -> bool:
    """True when a TCP connection to the hub endpoint (HF_ENDPOINT, default huggingface.co:443) opens quickly."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


@functools.lru_cache(maxsize=64)
def _from_path(resolved: str, mtime_ns: int) -> ModelEntry:
    """Cached per path and modification time, so an edited or re-uploaded config.json is read again."""
    path = Path(resolved)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            raise EstimatorError(
                f"model: folder {path} has no config.json; give a model folder with its config.json or the "
                "config.json file itself", field="model")
        name = path.name
    else:
        config_path = path
        name = path.parent.name if path.name == "config.json" else path.stem
    config = validate_config(_read_json(config_path), where=str(config_path))
    return ModelEntry(id=str(path), display_name=name or str(path), config=config, source="path")


@functools.lru_cache(maxsize=32)
def _from_hub(hub_id: str) -> ModelEntry:
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(hub_id, trust_remote_code=False)
    except (OSError, ValueError, HfHubHTTPError) as exc:
        raise EstimatorError(
            f"model: could not fetch the config of hub id {hub_id!r} ({str(exc).splitlines()[0]}); check the id "
            f"and your network, or give a catalog id or a local config.json ({_suggest(hub_id)})",
            field="model") from exc
    config = validate_config(cfg.to_dict(), where=f"{hub_id} config.json")
    return ModelEntry(id=hub_id, display_name=hub_id.split("/")[-1], config=config, hub_id=hub_id, source="hub")


def resolve_model(ref: str) -> ModelEntry:
    """Turn what the user typed into a validated ``ModelEntry``.

    Tried in order: a catalog id (case-insensitive), a catalog model's hub id (answered from the catalog, offline),
    a path to a ``config.json``, a local model folder (its ``config.json``; display name from the folder), and a
    hub id (``owner/name``) fetched with ``AutoConfig`` only when online, without remote code.
    Raises ``EstimatorError`` with close catalog matches when nothing fits or the hub is offline.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise EstimatorError("model: give a catalog id (see `ftadvisor models`), a config.json path or a model folder",
                             field="model")
    ref = ref.strip()
    catalog = _catalog()
    if ref in catalog:
        return catalog[ref]
    lowered = ref.lower()
    for entry in catalog.values():
        if lowered == entry.id.lower() or (entry.hub_id and lowered == entry.hub_id.lower()):
            return entry
    path = Path(ref).expanduser()
    if path.exists():
        resolved = path.resolve()
        config_file = resolved / "config.json" if resolved.is_dir() else resolved
        mtime = config_file.stat().st_mtime_ns if config_file.exists() else 0
        return _from_path(str(resolved), mtime)
    if ref.endswith(".json") or ref.startswith((".", "/", "~")) or os.sep + os.sep in ref:
        raise EstimatorError(f"model: no such file or folder {ref!r}; check the path ({_suggest(Path(ref).name)})",
                             field="model")
    if ref.count("/") == 1 and all(ref.split("/")):
        if _offline():
            raise EstimatorError(
                f"model: {ref!r} looks like a hub id, but the hub is offline (HF_HUB_OFFLINE is set), so its config "
                f"cannot be fetched; give a catalog id or a local config.json ({_suggest(ref)})", field="model")
        if not _hub_reachable():
            raise EstimatorError(
                f"model: {ref!r} looks like a hub id, but the hub cannot be reached (offline), so its config cannot "
                f"be fetched; give a catalog id or a local config.json ({_suggest(ref)})", field="model")
        return _from_hub(ref)
    raise EstimatorError(f"model: unknown model {ref!r}; {_suggest(ref)}", field="model")


# ------------------------------------------------------------------------------------------------------- GPUs

GIB = 1024**3
TERA = 10**12
GIGA = 10**9


class GPU(BaseModel):
    """One GPU type. Memory in bytes, dense peak FLOP/s (no sparsity), bandwidth in bytes/s, price in USD/hour."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    memory_bytes: int = Field(description="memory capacity in bytes (datasheet GiB x 2^30)")
    usable_bytes: int = Field(description="what a process can fill: the nvidia-smi total (usable_mib x 2^20)")
    compute_capability: float = Field(description="CUDA compute capability (9.0 = Hopper)")
    bf16_flops: float = Field(description="dense bf16 tensor peak FLOP/s, fp32 accumulate; 0 when unsupported")
    fp16_flops: float = Field(description="dense fp16 tensor peak FLOP/s, fp32 accumulate")
    fp32_flops: float = Field(description="dense fp32 peak FLOP/s without TF32 (PyTorch's default for matmul)")
    bandwidth_bytes_per_s: float = Field(description="memory bandwidth in bytes/s")
    price_usd_per_hour: float = Field(description="typical on-demand price of one GPU for one hour, USD")
    kind: Literal["consumer", "datacenter"]
    bf16_support: bool
    default_mfu: float = Field(description="model FLOPs utilisation assumed when none is given (0..1)")
    source: str = Field(description="where the figures come from")

    def flops_for(self, dtype: str) -> float:
        """Dense peak FLOP/s for a compute dtype ``fp32`` / ``bf16`` / ``fp16``; bf16 on a card without it fails."""
        if dtype == "bf16":
            if not self.bf16_support:
                raise EstimatorError(f"dtype: {self.name} has no bf16 support; use --dtype fp16 (or fp32)",
                                     field="dtype")
            return self.bf16_flops
        if dtype == "fp16":
            return self.fp16_flops
        if dtype == "fp32":
            return self.fp32_flops
        raise EstimatorError(f"dtype: unknown dtype {dtype!r}; use fp32, bf16 or fp16", field="dtype")


GPU_COLUMNS = (
    "id", "name", "kind", "memory_gib", "bf16_tflops", "fp16_tflops", "fp32_tflops", "bandwidth_gb_s",
    "price_usd_per_hour", "bf16_support", "default_mfu", "source", "usable_mib", "compute_capability",
    "usable_source",
)


@functools.lru_cache(maxsize=1)
def _gpus() -> dict[str, GPU]:
    with open(GPUS_FILE, encoding="utf-8", newline="") as fh:
        rows = [row for row in csv.DictReader(_skip_comments(fh))]
    gpus: dict[str, GPU] = {}
    for row in rows:
        missing = [c for c in GPU_COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise EstimatorError(f"{GPUS_FILE}: row {row.get('id')!r} lacks {', '.join(missing)}; fill them in",
                                 field="gpus.csv")
        gpus[row["id"]] = GPU(
            id=row["id"],
            name=row["name"],
            memory_bytes=round(float(row["memory_gib"]) * GIB),
            usable_bytes=round(float(row["usable_mib"]) * 1024**2),
            compute_capability=float(row["compute_capability"]),
            bf16_flops=float(row["bf16_tflops"]) * TERA,
            fp16_flops=float(row["fp16_tflops"]) * TERA,
            fp32_flops=float(row["fp32_tflops"]) * TERA,
            bandwidth_bytes_per_s=float(row["bandwidth_gb_s"]) * GIGA,
            price_usd_per_hour=float(row["price_usd_per_hour"]),
            kind=row["kind"],
            bf16_support=row["bf16_support"].strip().lower() in {"true", "yes", "1"},
            default_mfu=float(row["default_mfu"]),
            source=row["source"],
        )
    return gpus


def _skip_comments(lines):
    for line in lines:
        if not line.lstrip().startswith("#"):
            yield line


def list_gpus() -> list[GPU]:
    """Every catalog GPU, sorted by memory then id."""
    return sorted(_gpus().values(), key=lambda g: (g.memory_bytes, g.id))


def get_gpu(gpu_id: str) -> GPU:
    """The catalog GPU with this id (case-insensitive); unknown -> ``EstimatorError`` with close matches."""
    gpus = _gpus()
    key = (gpu_id or "").strip().lower()
    if key in gpus:
        return gpus[key]
    close = difflib.get_close_matches(key, list(gpus), n=5, cutoff=0.4)
    hint = f"close matches: {', '.join(close)}" if close else f"known: {', '.join(sorted(gpus))}"
    raise EstimatorError(f"gpu: unknown GPU {gpu_id!r}; {hint} (see `ftadvisor gpus`)", field="gpu")
