"""Use trained adapters: generate with base + adapter(s), switch, combine with weights, merge into the base.

``base`` is anything ``resolve_model_dir`` accepts (the demo id, a model folder, a hub id online); adapters are
folders with ``adapter_config.json`` + ``adapter_model.safetensors`` (a run's ``adapter/``). Everything loads in
fp32 on CPU unless CUDA is present. A QLoRA adapter is merged onto the base reloaded in full precision (never onto
the 4-bit weights, whose rounding would be baked in).
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.errors import RunnerError
from runner.models import resolve_model_dir

#: Default generation length, tokens.
DEFAULT_MAX_NEW_TOKENS = 64


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir() and (path / "adapter").is_dir():  # a run folder: use its adapter/
        path = path / "adapter"
    missing = [n for n in ("adapter_config.json", "adapter_model.safetensors") if not (path / n).is_file()]
    if missing:
        raise RunnerError(f"adapter folder {path} is missing {', '.join(missing)}", field="adapter",
                          fix="pass a run's adapter/ folder (saved by a LoRA/QLoRA run)")
    return path


def adapter_info(path: str | Path) -> dict:
    """adapter_config.json of an adapter folder (peft_type, r, target_modules, base_model_name_or_path, ...)."""
    return json.loads((check_adapter_dir(path) / "adapter_config.json").read_text(encoding="utf-8"))


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(base: str, dtype=None):
    """(model, tokenizer) of the base in full precision (fp32 unless dtype is given)."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.models import load_tokenizer

    folder = resolve_model_dir(base)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True)
    return model.to(_device()), load_tokenizer(folder)


def adapter_name(i: int, path: Path) -> str:
    """A peft adapter name for the i-th adapter: a<i>_<folder> (a run's adapter/ is named after the run)."""
    label = path.parent.name if path.name == "adapter" else path.name
    return f"a{i}_" + "".join(c if c.isalnum() else "_" for c in label)


def load_with_adapters(base: str, adapters: list[str | Path]):
    """(PeftModel with every adapter loaded under its own name, tokenizer, names). The first is active."""
    from peft import PeftModel

    if not adapters:
        raise RunnerError("give at least one adapter folder", field="adapters", fix="pass --adapter PATH")
    paths = [check_adapter_dir(a) for a in adapters]
    names = [adapter_name(i, p) for i, p in enumerate(paths)]
    model, tok = load_base(base)
    model = PeftModel.from_pretrained(model, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(path, adapter_name=name)
    model.set_adapter(names[0])
    model.eval()
    return model, tok, names


def chat_prompt(tokenizer, prompt: str, chat: bool = True) -> tuple[str, bool]:
    """Wrap a user message in the chat template when there is one (returns text, add_special_tokens)."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return text, False
    return prompt, True


def generate(base: str, adapters: list[str | Path], prompt: str, weights: list[float] | None = None,
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, chat: bool = True) -> str:
    """Greedy answer of base + adapters to ``prompt``. One adapter: that adapter. Several with ``weights``:
    their weighted combination ("cat", exact). Several without weights: the first (use :func:`generate_each` to compare)."""
    from runner.models import generate_batch

    model, tok, names = load_with_adapters(base, adapters)
    if weights is not None and len(names) > 1:
        _add_weighted(model, names, weights, "combined")
        model.set_adapter("combined")
    text, special = chat_prompt(tok, prompt, chat)
    return generate_batch(model, tok, [text], max_new_tokens, add_special_tokens=special)[0]


def generate_each(base: str, adapters: list[str | Path], prompt: str,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, chat: bool = True,
                  include_base: bool = True) -> dict[str, str]:
    """Answers of the base and of each adapter, switching adapters on one loaded base (``set_adapter``)."""
    from runner.models import generate_batch

    model, tok, names = load_with_adapters(base, adapters)
    text, special = chat_prompt(tok, prompt, chat)
    out = {}
    if include_base:
        with model.disable_adapter():
            out["base"] = generate_batch(model, tok, [text], max_new_tokens, add_special_tokens=special)[0]
    for name, path in zip(names, adapters):
        model.set_adapter(name)
        out[str(path)] = generate_batch(model, tok, [text], max_new_tokens, add_special_tokens=special)[0]
    return out


def _add_weighted(model, names: list[str], weights: list[float], new_name: str,
                  combination_type: str | None = None) -> str:
    if len(weights) != len(names):
        raise RunnerError(f"give one weight per adapter ({len(names)} adapters, {len(weights)} weights)",
                          field="weights", fix="pass as many --weight values as --adapter folders")
    ranks = {model.peft_config[n].r for n in names}
    # "cat" concatenates the A and B matrices (rank = sum of ranks): exactly sum_i w_i * B_i A_i for any ranks.
    # "linear" sums A and B with sqrt-weights (peft's definition), which needs equal ranks and is not that sum.
    combination_type = combination_type or "cat"
    if combination_type == "linear" and len(ranks) > 1:
        raise RunnerError(f"linear combination needs adapters of equal rank (got ranks {sorted(ranks)})",
                          field="combination_type", fix="use combination_type cat")
    model.add_weighted_adapter(adapters=names, weights=list(weights), adapter_name=new_name,
                               combination_type=combination_type)
    return combination_type


def combine(base: str, adapters: list[str | Path], weights: list[float], out_dir: str | Path,
            combination_type: str | None = None) -> Path:
    """Save the weighted combination of adapters as a new adapter folder (``add_weighted_adapter``).

    ``combination_type``: "linear" (equal ranks; sums A and B with sqrt-weights, peft's definition) or "cat"
    (concatenation; exactly sum_i w_i * delta_i for any ranks). Default: cat, which is exact; linear only when
    asked. Returns the folder (adapter_config.json + adapter_model.safetensors).
    """
    model, tok, names = load_with_adapters(base, adapters)
    _add_weighted(model, names, weights, "combined", combination_type or "cat")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, selected_adapters=["combined"], safe_serialization=True)
    saved = out_dir / "combined"  # peft saves non-default adapters in a sub-folder named after them
    if saved.is_dir():
        for f in saved.iterdir():
            f.replace(out_dir / f.name)
        saved.rmdir()
    tok.save_pretrained(out_dir)
    return out_dir


def merge(base: str, adapter: str | Path, out_dir: str | Path) -> Path:
    """Merge an adapter into the full-precision base (``merge_and_unload``) and save model + tokenizer as
    safetensors. For a QLoRA adapter the base is loaded unquantized, so the merge is onto 16/32-bit weights."""
    from peft import PeftModel

    path = check_adapter_dir(adapter)
    model, tok = load_base(base)
    model = PeftModel.from_pretrained(model, path)
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ base vs tuned


#: Column labels of a comparison: the base is always this word, adapters are "adapter: <name>", so the two
#: cannot be mixed up in a table or on the terminal.
BASE_LABEL = "base (no adapter)"


def adapter_label(path: str | Path) -> str:
    path = Path(path)
    return "adapter: " + (path.parent.name if path.name == "adapter" else path.name)


def generate_compare(base: str, adapters: list[str | Path], prompts: list[str],
                     max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, chat: bool = True) -> dict:
    """The same prompts through the bare base and through each adapter (one loaded base, adapters switched).

    Returns ``{"columns": [{"label", "kind": "base"|"adapter", "path"}], "rows": [{"prompt", "outputs": [...]}]}``
    with one output per column, in column order; the base column is first and is generated with every adapter
    disabled (``disable_adapter``).
    """
    from runner.models import generate_batch

    prompts = [p for p in prompts if p and p.strip()]
    if not prompts:
        raise RunnerError("give at least one prompt", field="prompt", fix="pass --prompt TEXT (repeat for several)")
    model, tok, names = load_with_adapters(base, adapters)
    texts = [chat_prompt(tok, p, chat) for p in prompts]
    special = texts[0][1]
    batch = [t for t, _ in texts]
    columns = [{"label": BASE_LABEL, "kind": "base", "path": str(resolve_model_dir(base))}]
    outputs = []
    with model.disable_adapter():
        outputs.append(generate_batch(model, tok, batch, max_new_tokens, add_special_tokens=special))
    labels = [adapter_label(p) for p in adapters]
    for i, (name, path) in enumerate(zip(names, adapters)):
        label = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]} ({i + 1})"
        columns.append({"label": label, "kind": "adapter", "path": str(check_adapter_dir(path))})
        model.set_adapter(name)
        outputs.append(generate_batch(model, tok, batch, max_new_tokens, add_special_tokens=special))
    rows = [{"prompt": p, "outputs": [col[j] for col in outputs]} for j, p in enumerate(prompts)]
    return {"columns": columns, "rows": rows}


def compare_text(result: dict) -> str:
    """A comparison as plain text: each prompt, then every column's answer under its label."""
    lines = []
    for row in result["rows"]:
        lines.append(f"=== prompt: {row['prompt']}")
        for col, out in zip(result["columns"], row["outputs"]):
            lines.append(f"--- [{col['label']}]")
            lines.append(out)
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ export


EXPORT_FORMATS = ("merged", "gguf")


def _save_dtype(folder: Path):
    """torch dtype the base ships in (config.json ``dtype`` / ``torch_dtype``); fp32 when it says nothing."""
    import torch

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def merged_model(base: str, adapter: str | Path):
    """(merged model in fp32, tokenizer, base folder): the adapter merged into the full-precision base.

    A QLoRA adapter is merged the same way: onto the base's full-precision weights reloaded from its folder,
    never onto 4-bit weights."""
    from peft import PeftModel

    path = check_adapter_dir(adapter)
    model, tok = load_base(base)
    merged = PeftModel.from_pretrained(model, path).merge_and_unload()
    merged.eval()
    return merged, tok, resolve_model_dir(base)


def export(base: str, adapter: str | Path, fmt: str, output: str | Path, gguf_type: str = "f16",
           verify: bool = False) -> dict:
    """Export base + adapter for serving. Returns what was written and how to serve it.

    - ``merged``: a safetensors folder (weights in the base's own dtype, merged in fp32), tokenizer with its chat
      template, generation config: loads with ``AutoModelForCausalLM.from_pretrained`` and ``vllm serve``.
    - ``gguf``: ``<output>/<name>.gguf`` (f16 or q8_0, tokenizer and chat template inside) plus an Ollama
      ``Modelfile``; llama family only (runner/tools/gguf_export.py). ``verify`` reads it back with transformers' GGUF
      reader and reports the logits difference from the merged model.

    Every export also names the adapter folder as it is for vLLM's LoRA serving and the ``vllm serve`` line.
    """
    from runner.tools import gguf_export

    if fmt not in EXPORT_FORMATS:
        raise RunnerError(f"format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})", field="format",
                          fix="pass --format merged or --format gguf")
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise RunnerError(f"gguf type must be one of {', '.join(gguf_export.GGUF_TYPES)} (got {gguf_type!r})",
                          field="gguf_type", fix="pass --gguf-type f16 or q8_0")
    path = check_adapter_dir(adapter)
    out = Path(output).expanduser()
    if out.is_file():
        raise RunnerError(f"output {out} is a file", field="output", fix="pass a folder for --output")
    info = adapter_info(path)
    model, tok, base_dir = merged_model(base, path)
    if fmt == "gguf":
        gguf_export.check_supported(model.config, type(model).__name__)  # refuse before writing
    out.mkdir(parents=True, exist_ok=True)
    result = {"format": fmt, "output": str(out.resolve()), "files": [],
              "vllm_lora": {"adapter": str(path.resolve()),
                            "command": gguf_export.vllm_lora_command(str(base_dir), path.resolve(),
                                                                     name=adapter_label(path).split(": ", 1)[1],
                                                                     max_rank=info.get("r"))}}
    if fmt == "merged":
        dtype = _save_dtype(base_dir)
        model.to(dtype).save_pretrained(out, safe_serialization=True)
        tok.save_pretrained(out)
        result["dtype"] = str(dtype).removeprefix("torch.")
        result["serve"] = f"vllm serve {out.resolve()}"
    else:
        gguf_file = out / f"{out.name}.gguf"
        gguf_export.write_gguf(model, tok, gguf_file, gguf_type, name=out.name)
        (out / "Modelfile").write_text(gguf_export.ollama_modelfile(gguf_file.name, getattr(tok, "chat_template", None),
                                                                    tok.eos_token, gguf_export.default_system_prompt(tok)),
                                       encoding="utf-8")
        result["gguf_type"] = gguf_type
        result["serve"] = f"cd {out.resolve()} && ollama create {out.name} -f Modelfile && ollama run {out.name}"
        if verify:
            from runner.tools.forgetting import load_texts

            ids = tok(load_texts()[0], return_tensors="pt")["input_ids"]  # a general-text paragraph
            result["roundtrip"] = gguf_export.gguf_roundtrip_error(model, gguf_file, ids)
    result["files"] = sorted(f.name for f in out.iterdir() if f.is_file())
    result["bytes"] = sum((out / f).stat().st_size for f in result["files"])
    return result
