"""Tiny real models for tests, the browser check and benchmarks: built from a config, no network, seconds.

``build_tiny_model(folder)`` writes a complete Hugging Face model folder: ``config.json``, random weights as
``model.safetensors`` (fixed seed), and a byte-level BPE tokenizer trained locally on a small built-in corpus,
with a ChatML chat template so ``messages`` datasets work.
"""

from __future__ import annotations

import random
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


def _corpus(n_lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ("the a model data train loss rank adapter memory token review good bad great poor movie "
             "service product happy sad positive negative neutral question answer sum plus minus equals "
             "what is of and to in for on with user assistant system").split()
    lines = []
    for i in range(n_lines):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} plus {b}? {a + b}")
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))))
    return lines


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the built-in corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>",
                                   bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden_size: int = 64, layers: int = 2):
    """A small config of a real architecture (llama, qwen2, gpt2 or mixtral)."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=512, tie_word_embeddings=True)
    if arch == "gpt2":
        return GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=512)
    if arch == "mixtral":  # MoE: 4 experts, 2 active, fused 3D expert weights in transformers 5
        from transformers import MixtralConfig

        return MixtralConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
                             tie_word_embeddings=False)
    raise ValueError(f"arch must be llama, qwen2, gpt2 or mixtral (got {arch!r})")


def build_tiny_model(folder: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a tiny, complete model folder (config, safetensors weights, tokenizer) and return its path."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


if __name__ == "__main__":  # python -m runner.train.tinymodel OUT_DIR [arch]
    import sys

    print(build_tiny_model(sys.argv[1], *(sys.argv[2:3] or ["llama"])))
