"""Write a model (a merged fine-tune) as one GGUF file for llama.cpp / Ollama, with the ``gguf`` package.

Supported: the llama family as llama.cpp names it: ``LlamaForCausalLM`` and ``MistralForCausalLM`` (GGUF
architecture ``llama``) and ``Qwen2ForCausalLM`` (``qwen2``), with a byte-level BPE tokenizer (GPT-2 style:
tokens, merges, token types; Llama-3, Qwen2, SmolLM2, ...) or a SentencePiece-style BPE tokenizer (``llama``:
tokens, scores, token types; Llama-2, Mistral). Anything else is refused with the list of what is supported.

What the file holds, following the GGUF spec (ggml-org/ggml docs/gguf.md) and the names llama.cpp reads:

- ``general.*`` and ``<arch>.*`` hyper-parameters (context, embedding and feed-forward length, blocks, heads, KV
  heads, RoPE base and dimension, RMS-norm epsilon, vocabulary size);
- tensors renamed with the gguf package's own HF -> GGUF table (``gguf.get_tensor_name_map``); for ``llama`` the
  query and key rows are permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one
  (the inverse of what transformers' GGUF reader undoes); 2-D weights in f16 or q8_0 (``gguf.quants``), norms and
  biases in f32, as llama.cpp's converter does; the LM head only when it is not tied to the embeddings;
- ``tokenizer.ggml.*`` (model, pre-tokenizer, tokens, merges or scores, token types, special ids, add-BOS) and
  ``tokenizer.chat_template``.

The file is checked by reading it back with transformers' own GGUF reader (tests/test_gguf_export.py): logits
match the merged model within f16 rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.errors import RunnerError

#: transformers class -> GGUF architecture name (llama.cpp's LLM_ARCH names).
SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_TYPES = ("f16", "q8_0")
#: q8_0 blocks hold 32 weights (ggml's QK8_0); a row whose length is not a multiple stays f16.
Q8_0_BLOCK = 32

#: Pre-tokenizer split regexes of byte-level BPE tokenizers -> llama.cpp's ``tokenizer.ggml.pre`` names.
#: Llama-3's and Qwen2's patterns are the published ones from their tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}

#: GGUF token types (gguf.TokenType): NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.


def supported_text() -> str:
    return ", ".join(sorted(SUPPORTED_ARCHITECTURES))


def check_supported(config, class_name: str | None = None) -> str:
    """The GGUF architecture for a transformers config (or the model's class name when the config lists no
    ``architectures``, as for a model built from a config), or a RunnerError naming the supported ones."""
    archs = list(getattr(config, "architectures", None) or []) or ([class_name] if class_name else [])
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise RunnerError(f"GGUF export supports {supported_text()} (this model is {', '.join(archs) or config.model_type})",
                          field="format", kind="bad_spec",
                          fix="export --format merged (safetensors for transformers / vLLM) for this architecture")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", None):
        raise RunnerError(f"GGUF export writes plain RoPE; this model uses {rope['rope_type']!r} RoPE scaling",
                          field="format", fix="export --format merged, or convert with llama.cpp's convert_hf_to_gguf.py")
    if getattr(config, "attention_bias", False) and SUPPORTED_ARCHITECTURES[arch] == "llama":
        raise RunnerError("GGUF export of llama models with attention biases is not supported", field="format",
                          fix="export --format merged")
    return SUPPORTED_ARCHITECTURES[arch]


def _rope(config) -> dict:
    """rope_theta and rope_type from a v4 (rope_theta / rope_scaling) or v5 (rope_parameters) config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return {"rope_theta": float(theta if theta is not None else 10000.0), "rope_type": rope_type}


def _permute_rope(w, n_head: int):
    """HF rotate-half row order -> llama.cpp interleaved pairs, per head (rows of q_proj / k_proj)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -------------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RunnerError("GGUF export needs a fast tokenizer (tokenizer.json)", field="tokenizer",
                          fix="save the tokenizer with transformers so the folder has tokenizer.json")
    return json.loads(backend.to_str())


def _pre_name(pre: dict | None) -> str:
    """llama.cpp's pre-tokenizer name for a byte-level tokenizer.json pre_tokenizer (refuses unknown regexes)."""
    if pre is None:
        return "default"
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) else "default"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers", [])
        types = [p.get("type") for p in parts]
        if types == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"  # SmolLM's tokenizer.json: single digits, then GPT-2's byte-level split
        splits = [p for p in parts if p.get("type") == "Split"]
        if splits:
            regex = splits[0].get("pattern", {}).get("Regex")
            if regex in PRE_TOKENIZER_NAMES:
                return PRE_TOKENIZER_NAMES[regex]
    raise RunnerError(f"GGUF export does not know this tokenizer's pre-tokenizer ({json.dumps(pre)[:200]})",
                      field="tokenizer", fix="export --format merged, or convert with llama.cpp's converter")


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """Everything ``tokenizer.ggml.*`` needs, from a transformers fast tokenizer.

    ``vocab_size`` is the model's embedding rows; ids the tokenizer lacks are padded as ``[PAD<id>]`` UNUSED
    tokens (llama.cpp's converter does the same), so token i is embedding row i.
    """
    tj = _tokenizer_json(tokenizer)
    model = tj["model"]
    if model.get("type") != "BPE":
        raise RunnerError(f"GGUF export supports BPE tokenizers (this one is {model.get('type')})",
                          field="tokenizer", fix="export --format merged")
    vocab = tokenizer.get_vocab()  # includes added tokens
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise RunnerError(f"tokenizer has ids up to {max(by_id)} but the model has {vocab_size} embedding rows",
                          field="tokenizer", fix="use the tokenizer saved with this model")
    byte_fallback = bool(model.get("byte_fallback"))
    tokens, types, scores = [], [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        elif i in added:
            tokens.append(tok)
            types.append(3 if added[i].get("special") else 4)
        elif byte_fallback and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            tokens.append(tok)
            types.append(6)
        else:
            tokens.append(tok)
            types.append(1)
        # SentencePiece-style score: earlier ids are merged first (the BPE vocab is in merge order); specials 0
        scores.append(0.0 if types[-1] != 1 else -float(i))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_fallback:  # Llama-2 / Mistral: SentencePiece BPE over "▁"-joined words
        kind, pre = "llama", None
    else:
        kind, pre = "gpt2", _pre_name(tj.get("pre_tokenizer"))
    probe = tokenizer("a")["input_ids"]
    add_bos = bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    return {"model": kind, "pre": pre, "tokens": tokens, "types": types, "scores": scores, "merges": merges,
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
            "unk": tokenizer.unk_token_id, "add_bos": add_bos,
            "chat_template": getattr(tokenizer, "chat_template", None)}


# ------------------------------------------------------------------------------------------------------ writer


def write_gguf(model, tokenizer, out_file: str | Path, gguf_type: str = "f16", name: str | None = None) -> Path:
    """Write ``model`` (a transformers causal LM, e.g. a merged fine-tune) and its tokenizer as one GGUF file.

    ``gguf_type``: ``f16`` (2-D weights in float16) or ``q8_0`` (8-bit blocks of 32 with an f16 scale, ggml's
    Q8_0). Returns the file's path.
    """
    import gguf
    import numpy as np
    import torch

    if gguf_type not in GGUF_TYPES:
        raise RunnerError(f"gguf type must be one of {', '.join(GGUF_TYPES)} (got {gguf_type!r})",
                          field="gguf_type", fix="pass --gguf-type f16 or q8_0")
    cfg = model.config
    arch = check_supported(cfg, type(model).__name__)
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    tok = tokenizer_fields(tokenizer, vocab_size)

    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_block_count(int(cfg.num_hidden_layers))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(n_head))
    writer.add_head_count_kv(int(n_kv))
    writer.add_rope_freq_base(_rope(cfg)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(int(vocab_size))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim * n_head != cfg.hidden_size:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)

    writer.add_tokenizer_model(tok["model"])
    if tok["pre"]:
        writer.add_tokenizer_pre(tok["pre"])
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    if tok["model"] == "llama":
        writer.add_token_scores(tok["scores"])
    if tok["merges"]:
        writer.add_token_merges(tok["merges"])
    for key, fn in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                    ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if tok[key] is not None:
            fn(int(tok[key]))
    writer.add_add_bos_token(tok["add_bos"])
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), int(cfg.num_hidden_layers))
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue
        if key.endswith("rotary_emb.inv_freq"):
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise RunnerError(f"GGUF export: no GGUF name for tensor {key}", field="format",
                              fix="export --format merged")
        data = tensor.numpy()
        if arch == "llama" and key.endswith("self_attn.q_proj.weight"):
            data = _permute_rope(data, n_head)
        elif arch == "llama" and key.endswith("self_attn.k_proj.weight"):
            data = _permute_rope(data, n_kv)
        data = np.ascontiguousarray(data)
        if data.ndim == 1:
            writer.add_tensor(new, data.astype(np.float32))
        elif gguf_type == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
            q = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(new, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(new, data.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out_file)
    return out_file


# ------------------------------------------------------------------------------------------- Ollama / vLLM


def default_system_prompt(tokenizer) -> str | None:
    """The system message a ChatML chat template inserts when the conversation has none (SmolLM2's does), read by
    rendering the template with one user message; None when it inserts none."""
    import re

    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    m = re.match(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return m.group(1) if m else None


def ollama_modelfile(gguf_name: str, chat_template: str | None, eos_token: str | None,
                     system: str | None = None) -> str:
    """An Ollama ``Modelfile`` for a GGUF beside it. ChatML templates (``<|im_start|>``) get Ollama's Go template
    and stop token written out, and ``system`` (the template's default system message) as SYSTEM; for other
    templates Ollama reads ``tokenizer.chat_template`` from the file."""
    lines = ["# Ollama: ollama create my-model -f Modelfile && ollama run my-model", f"FROM ./{gguf_name}", ""]
    if system and chat_template and "<|im_start|>" in chat_template:
        lines += [f'SYSTEM """{system}"""']
    if chat_template and "<|im_start|>" in chat_template:
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system',
                  '{{ .System }}<|im_end|>',
                  '{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}',
                  '{{ .Content }}<|im_end|>',
                  '{{ end }}<|im_start|>assistant',
                  '"""',
                  'PARAMETER stop "<|im_end|>"']
    elif eos_token:
        lines += [f'PARAMETER stop "{eos_token}"']
    lines += ["PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


def vllm_lora_command(base: str, adapter_dir: str | Path, name: str = "adapter", max_rank: int | None = None) -> str:
    """The ``vllm serve`` line that serves the base with this adapter as a LoRA module (vLLM's --enable-lora)."""
    import shlex

    parts = ["vllm", "serve", str(base), "--enable-lora", "--lora-modules", f"{name}={Path(adapter_dir)}"]
    if max_rank:
        parts += ["--max-lora-rank", str(max_rank)]
    return shlex.join(parts)


def gguf_roundtrip_error(model, gguf_file: str | Path, input_ids) -> dict:
    """Logits of ``model`` vs the GGUF read back by transformers' GGUF reader, on ``input_ids`` (B, T).

    Returns max absolute difference, the largest logit magnitude, and the share of positions whose argmax agrees.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file = Path(gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    loaded.eval()
    model.eval()
    with torch.no_grad():
        a = model(input_ids=input_ids).logits.float()
        b = loaded(input_ids=input_ids).logits.float()
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_logit": float(a.abs().max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}
