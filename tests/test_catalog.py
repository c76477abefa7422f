"""Model and GPU catalogs: every entry checked against its published figures; bad input gives a clear error."""

from __future__ import annotations

import csv
import json

import pytest

from estimator.catalog import (
    GPU_COLUMNS,
    GPUS_FILE,
    MAX_LAYERS,
    get_gpu,
    list_gpus,
    list_models,
    model_ids,
    resolve_model,
)
from estimator.errors import EstimatorError
from estimator.params import build_meta_model, count_parameters
from ftcore.errors import UserError

# The ids issue 2 requires in the catalog.
REQUIRED_MODELS = {
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-175b", "llama-2-7b", "llama-2-13b", "llama-2-70b",
    "llama-3.1-8b", "llama-3.1-70b", "llama-3.1-405b", "mistral-7b", "mixtral-8x7b", "qwen2.5-0.5b",
    "qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "gemma-2-2b", "gemma-2-9b",
    "gemma-2-27b", "phi-3-mini-4k", "tinyllama-1.1b", "smollm2-135m",
    # MoE beyond Mixtral (issue 10): fine-grained experts, MLA with shared experts and dense first layers
    "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v2-lite", "deepseek-v3", "phi-3.5-moe",
}
REQUIRED_GPUS = {
    "rtx-3090", "rtx-4090", "rtx-a6000", "t4", "l4", "a10g", "l40s", "v100-32gb", "a100-40gb", "a100-80gb",
    "h100-80gb", "h200-141gb", "b200",
}
# The GPT-3 paper (arXiv:2005.14165, Table 2.1) gives "175.0B": rounded to 0.1B of a figure it does not spell
# out, and the paper's own shape gives 174.6B with a GPT-2 vocabulary, so the rounded check allows 0.5%.
ROUNDED_TOLERANCE = 0.005

# Totals quoted in REFERENCE.md, checked here independently of catalog.yaml (a typo there must not pass).
REFERENCE_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,  # same architecture as Llama-3-8B: 8,030,261,248
    "mistral-7b": 7_241_732_096,
    "qwen2.5-7b": 7_615_616_512,
    "llama-2-70b": 68_976_648_192,
    "smollm2-135m": 134_515_008,
}


def test_catalog_has_every_required_model():
    assert REQUIRED_MODELS <= set(model_ids())
    for entry in list_models():
        assert entry.display_name and entry.params_source and entry.published_params


@pytest.mark.parametrize("model_id", sorted(REQUIRED_MODELS))
def test_meta_model_matches_published_parameter_count(model_id):
    entry = resolve_model(model_id)
    total = count_parameters(build_meta_model(entry)).total
    if entry.published_params_exact:
        assert total == entry.published_params
    else:
        assert abs(total - entry.published_params) <= ROUNDED_TOLERANCE * entry.published_params
    if model_id in REFERENCE_TOTALS:
        assert total == REFERENCE_TOTALS[model_id]


# Parameters used per token, from sources independent of the meta model: Mistral's announcement for Mixtral
# (12.9B, rounded), a recount of Qwen3-30B-A3B's checkpoint (3,353,032,704) and of DeepSeek-V3's config
# (37,552,282,624 active; the paper says 37B).
PUBLISHED_ACTIVE = {"qwen3-30b-a3b": 3_353_032_704, "deepseek-v3": 37_552_282_624}


@pytest.mark.parametrize("model_id", sorted(PUBLISHED_ACTIVE))
def test_moe_active_parameters_match_published_counts(model_id):
    assert count_parameters(build_meta_model(resolve_model(model_id))).active == PUBLISHED_ACTIVE[model_id]


def test_mixtral_active_parameters_are_the_announced_12_9b():
    active = count_parameters(build_meta_model(resolve_model("mixtral-8x7b"))).active
    assert abs(active - 12.9e9) <= 0.005 * 12.9e9


def test_only_gpt3_uses_a_rounded_published_figure():
    assert [e.id for e in list_models() if not e.published_params_exact] == ["gpt3-175b"]


@pytest.mark.parametrize("model_id", sorted(REQUIRED_MODELS))
def test_catalog_config_builds_with_transformers_offline(model_id):
    entry = resolve_model(model_id)
    cfg = entry.hf_config()
    assert cfg.model_type == entry.config["model_type"]
    assert entry.config.get("architectures"), "architectures lets AutoModelForCausalLM pick the right class"


def test_resolve_is_case_insensitive_and_knows_catalog_hub_ids_offline():
    assert resolve_model("Llama-2-7B").id == "llama-2-7b"
    assert resolve_model("meta-llama/Llama-2-7b-hf").id == "llama-2-7b"


def test_resolve_config_json_path_and_model_folder(tmp_path):
    folder = tmp_path / "my-small-llama"
    folder.mkdir()
    cfg = dict(resolve_model("smollm2-135m").config)
    (folder / "config.json").write_text(json.dumps(cfg))
    by_file = resolve_model(str(folder / "config.json"))
    by_folder = resolve_model(str(folder))
    assert by_file.source == by_folder.source == "path"
    assert by_folder.display_name == "my-small-llama"
    assert by_file.published_params is None
    assert count_parameters(build_meta_model(by_folder)).total == 134_515_008


def test_resolve_real_tiny_model_folder(tiny_model_dir):
    entry = resolve_model(str(tiny_model_dir))
    assert entry.source == "path" and entry.config["model_type"] == "llama"


def test_hub_id_offline_says_offline_and_suggests(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EstimatorError) as err:
        resolve_model("meta-llama/Llama-2-7b-chat-hf")
    assert "offline" in str(err.value)
    assert "llama-2-7b" in str(err.value)
    assert err.value.field == "model"
    assert isinstance(err.value, UserError)


def test_unknown_id_suggests_close_matches():
    with pytest.raises(EstimatorError) as err:
        resolve_model("llama2-7b")
    assert "llama-2-7b" in str(err.value)
    with pytest.raises(EstimatorError) as err:
        resolve_model("qwen-2.5-7b")
    assert "qwen2.5-7b" in str(err.value)


# ------------------------------------------------------------------------------------------- bad configs

GOOD = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}


def _with(**changes):
    cfg = dict(GOOD)
    for key, value in changes.items():
        if value is _DROP:
            cfg.pop(key)
        else:
            cfg[key] = value
    return cfg


_DROP = object()

BAD_CONFIGS = [
    (_with(model_type=_DROP), "model_type"),
    (_with(model_type="lama"), "model_type"),
    (_with(model_type="vit"), "model_type"),  # an image encoder: no causal-LM head
    (_with(hidden_size=_DROP), "hidden_size"),
    (_with(num_hidden_layers=_DROP), "num_hidden_layers"),
    (_with(vocab_size=_DROP), "vocab_size"),
    (_with(num_attention_heads=_DROP), "num_attention_heads"),
    (_with(num_hidden_layers=0), "num_hidden_layers"),
    (_with(hidden_size=-64), "hidden_size"),
    (_with(num_hidden_layers=10**12), "num_hidden_layers"),  # a trillion layers
    (_with(num_hidden_layers=MAX_LAYERS + 1), "num_hidden_layers"),
    (_with(vocab_size=10**9), "vocab_size"),
    (_with(hidden_size="4096"), "hidden_size"),
    (_with(hidden_size=64.5), "hidden_size"),
    (_with(num_hidden_layers=True), "num_hidden_layers"),
    (_with(intermediate_size=0), "intermediate_size"),
    (_with(num_attention_heads=5), "num_attention_heads"),  # 64 not divisible by 5
    (_with(num_key_value_heads=3), "num_key_value_heads"),  # 4 heads not a multiple of 3
    (_with(num_local_experts=4, num_experts_per_tok=8), "num_experts_per_tok"),
    (_with(hidden_size=900_000, num_hidden_layers=900, vocab_size=1_000_000), "hidden_size"),  # 1e18 parameters
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("config,field", BAD_CONFIGS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_CONFIGS)])
def test_bad_config_names_the_field(tmp_path, config, field):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(EstimatorError) as err:
        resolve_model(str(path))
    assert field in str(err.value)
    assert err.value.field == field


def test_head_dim_lets_heads_not_divide_hidden(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(_with(num_attention_heads=6, num_key_value_heads=2, head_dim=16)))
    assert resolve_model(str(path)).config["head_dim"] == 16


@pytest.mark.timeout(30)
@pytest.mark.parametrize("text,needle", [
    ('{"model_type": "llama", "hidden_size": 64, "num_hid', "invalid JSON"),  # truncated download
    ("[1, 2, 3]", "JSON object"),
    ("", "invalid JSON"),
    ('{"text_config": {"hidden_size": 8}, "model_type": "llava"}', "text_config"),
])
def test_unreadable_config_files(tmp_path, text, needle):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(EstimatorError) as err:
        resolve_model(str(path))
    assert needle in str(err.value)


def test_missing_path_and_folder_without_config(tmp_path):
    with pytest.raises(EstimatorError, match="no such file"):
        resolve_model(str(tmp_path / "nope" / "config.json"))
    with pytest.raises(EstimatorError, match="no config.json"):
        resolve_model(str(tmp_path))


# ------------------------------------------------------------------------------------------------- GPUs


def _csv_rows():
    with open(GPUS_FILE, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(line for line in fh if not line.lstrip().startswith("#")))


def test_gpu_csv_has_every_column_and_unique_ids():
    rows = _csv_rows()
    assert set(GPU_COLUMNS) <= set(rows[0])
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids))
    assert REQUIRED_GPUS <= set(ids)
    for row in rows:
        assert all((row[c] or "").strip() for c in GPU_COLUMNS), row["id"]


@pytest.mark.parametrize("gpu_id", sorted(REQUIRED_GPUS))
def test_gpu_figures_are_positive_and_consistent(gpu_id):
    gpu = get_gpu(gpu_id)
    assert gpu.memory_bytes >= 16 * 1024**3
    assert gpu.fp16_flops > 0 and gpu.fp32_flops > 0 and gpu.bandwidth_bytes_per_s > 0
    assert gpu.price_usd_per_hour > 0 and 0 < gpu.default_mfu <= 1
    assert gpu.kind in ("consumer", "datacenter")
    assert gpu.fp32_flops < gpu.fp16_flops, "tensor-core fp16 peak is above plain fp32 on every listed card"
    assert gpu.bf16_support == (gpu.bf16_flops > 0)
    assert gpu.source


def test_cards_without_bf16_ask_for_fp16():
    for gpu_id in ("t4", "v100-32gb"):
        gpu = get_gpu(gpu_id)
        assert not gpu.bf16_support
        with pytest.raises(EstimatorError, match="fp16"):
            gpu.flops_for("bf16")
        assert gpu.flops_for("fp16") == gpu.fp16_flops
    assert get_gpu("a100-80gb").flops_for("bf16") == 312e12  # NVIDIA A100 datasheet, dense BF16


def test_gpu_memory_matches_datasheet_capacity():
    # Capacities from the vendor datasheets (GB as GiB): the catalog must not drift from them.
    assert get_gpu("rtx-4090").memory_bytes == 24 * 1024**3
    assert get_gpu("a100-40gb").memory_bytes == 40 * 1024**3
    assert get_gpu("h100-80gb").memory_bytes == 80 * 1024**3
    assert get_gpu("h200-141gb").memory_bytes == 141 * 1024**3


def test_unknown_gpu_suggests_close_matches():
    with pytest.raises(EstimatorError) as err:
        get_gpu("a100")
    assert "a100-80gb" in str(err.value) and "a100-40gb" in str(err.value)
    assert err.value.field == "gpu"
    assert get_gpu("H100-80GB").id == "h100-80gb"


def test_list_gpus_sorted_by_memory():
    mem = [g.memory_bytes for g in list_gpus()]
    assert mem == sorted(mem)


def test_edited_config_file_is_read_again(tmp_path):
    import os

    path = tmp_path / "config.json"
    path.write_text(json.dumps(GOOD))
    assert resolve_model(str(path)).config["num_hidden_layers"] == 2
    path.write_text(json.dumps(_with(num_hidden_layers=3)))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert resolve_model(str(path)).config["num_hidden_layers"] == 3


def test_model_entry_is_hashable_for_caches():
    assert hash(resolve_model("gpt2")) == hash(resolve_model("openai-community/gpt2"))
    assert len({resolve_model("gpt2"), resolve_model("llama-2-7b")}) == 2


@pytest.mark.timeout(20)
def test_unreachable_hub_fails_fast_as_offline(monkeypatch):
    # Nothing listens on port 9 of localhost: the probe is refused at once instead of huggingface_hub's
    # five retries with backoff (about 25 s).
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(EstimatorError) as err:
        resolve_model("someone/some-model-7b")
    assert "offline" in str(err.value) and err.value.field == "model"


@pytest.mark.parametrize("model_id", [m.id for m in list_models()])
def test_shipped_configs_validate(model_id):
    """The catalog loads shipped configs without validating them (fast listing); this test does it instead."""
    from estimator.catalog import MODELS_DIR, validate_config

    path = MODELS_DIR / model_id / "config.json"
    validate_config(json.loads(path.read_text(encoding="utf-8")), where=str(path))
