"""``ftadvisor adapters ...``: generate with, compare, merge, export, combine adapters and count their intruder
dimensions; formatting only (the work is ``runner.tools.adapters`` and ``runner.tools.intruder``)."""

from __future__ import annotations

import json

from ftcore.errors import UserError
from runner.cli import json_command, model_ready


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise UserError(f"weights: give comma-separated numbers like 0.7,0.3 (got {text!r})",
                        field="weights") from None
    if len(weights) != n:
        raise UserError(f"weights: give one weight per --adapter ({n}), got {len(weights)}", field="weights")
    return weights


def cmd_adapters_generate(args) -> int:
    from runner.tools import adapters

    model_ready(args.base)
    prompts = args.prompt
    if args.compare:  # the same prompts through the bare base and each adapter, in labelled columns
        result = adapters.generate_compare(args.base, args.adapter or [], prompts, max_new_tokens=args.max_new_tokens)
        print(json.dumps({"base": args.base, **result}, indent=2) if args.json else adapters.compare_text(result))
        return 0
    if len(prompts) > 1:
        raise UserError("prompt: several --prompt values need --compare", field="prompt")
    args.prompt = prompts[0]
    if args.each:  # one base loaded once, switching between the adapters (and the bare base)
        answers = adapters.generate_each(args.base, args.adapter or [], args.prompt,
                                         max_new_tokens=args.max_new_tokens)
        if args.json:
            print(json.dumps({"base": args.base, "prompt": args.prompt, "outputs": answers}, indent=2))
        else:
            for name, text in answers.items():
                print(f"[{name}]\n{text}\n")
        return 0
    text = adapters.generate(args.base, args.adapter or [], args.prompt,
                             weights=_weights(args.weights, len(args.adapter or [])),
                             max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"base": args.base, "adapters": args.adapter or [], "prompt": args.prompt,
                          "output": text}, indent=2))
    else:
        print(text)
    return 0


def cmd_adapters_merge(args) -> int:
    from runner.tools import adapters

    model_ready(args.base)
    out = adapters.merge(args.base, args.adapter, args.output)
    print(json.dumps({"output": str(out)}) if args.json else f"merged model saved to {out}")
    return 0


def cmd_adapters_export(args) -> int:
    from runner.tools import adapters

    model_ready(args.base)
    res = adapters.export(args.base, args.adapter, args.format, args.output,
                          gguf_type=args.gguf_type, verify=args.verify)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['format']} export written to {res['output']} ({res['bytes'] / 2**20:.1f} MiB): "
          + ", ".join(res["files"]))
    if "roundtrip" in res:
        rt = res["roundtrip"]
        print(f"read back by transformers: max |logit difference| {rt['max_abs_diff']:.2e} "
              f"(largest logit {rt['max_abs_logit']:.1f}), argmax agreement {rt['argmax_agreement']:.0%}")
    print(f"serve it:          {res['serve']}")
    print(f"or serve the adapter as it is with vLLM: {res['vllm_lora']['command']}")
    return 0


def cmd_adapters_intruders(args) -> int:
    from runner.tools import intruder

    top_k = intruder.INTRUDER_TOP_K if args.top_k is None else args.top_k
    epsilon = intruder.INTRUDER_EPSILON if args.epsilon is None else args.epsilon
    if top_k < 1:
        raise UserError(f"top-k: give at least 1 singular vector (got {top_k})", field="top_k")
    if not 0 < epsilon <= 1:
        raise UserError(f"epsilon: a cosine threshold between 0 and 1 (got {epsilon})", field="epsilon")
    rep = intruder.adapter_intruders(args.base, args.adapter, top_k=top_k, epsilon=epsilon)
    if args.json:
        print(json.dumps(rep.model_dump(), indent=2))
        return 0
    s = rep.summary
    print(f"intruder dimensions (top {rep.top_k} singular vectors, max |cos| < {rep.epsilon}; {rep.reference}):")
    print(f"{s.total} in {s.modules} modules ({s.modules_with_intruders} with any), "
          f"{s.mean_per_module:.2f} per module, {s.seconds:.1f} s")
    for m in rep.per_module:
        print(f"  {m.module:<48} {m.intruders:>2}   ||dW||/||W|| {m.delta_norm_ratio:.4f}")
    return 0


def cmd_adapters_combine(args) -> int:
    from runner.tools import adapters

    model_ready(args.base)
    if len(args.adapter) < 2:
        raise UserError("adapter: combine needs at least two --adapter folders", field="adapter")
    weights = _weights(args.weights, len(args.adapter)) or [1.0 / len(args.adapter)] * len(args.adapter)
    out = adapters.combine(args.base, args.adapter, weights, args.output, combination_type=args.combination)
    print(json.dumps({"output": str(out)}) if args.json else f"combined adapter saved to {out}")
    return 0


def register(subparsers) -> None:
    """Add ``adapters`` to the ``ftadvisor`` parser."""
    adapters = subparsers.add_parser("adapters", help="generate with, merge or combine LoRA adapters")
    asub = adapters.add_subparsers(dest="action", metavar="ACTION", required=True)

    def adapter_action(name, func, help_text, adapter="one"):
        """``--base`` and ``--adapter`` (``one``: exactly one; ``several``: repeated, at least one; ``any``:
        repeated or none, the base alone)."""
        p = json_command(asub, name, func, help_text)
        p.add_argument("--base", required=True, help="base model: catalog id, hub id or folder")
        if adapter == "one":
            p.add_argument("--adapter", required=True, help="adapter folder (or a run folder)")
        else:
            p.add_argument("--adapter", action="append", required=adapter == "several",
                           help="adapter folder or run folder (repeat for several)")
        return p

    gen = adapter_action("generate", cmd_adapters_generate, "generate text with a base model and adapter(s)",
                         adapter="any")
    gen.add_argument("--weights", help="comma-separated weights when several adapters are given")
    gen.add_argument("--prompt", required=True, action="append", help="prompt (repeat with --compare)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--each", action="store_true", help="answer with the base and with each adapter in turn")
    gen.add_argument("--compare", action="store_true",
                     help="the same prompts through the base and each adapter, side by side with labels")
    merge = adapter_action("merge", cmd_adapters_merge, "merge an adapter into its base and save a full model")
    merge.add_argument("--output", required=True, help="folder for the merged model")
    exp = adapter_action("export", cmd_adapters_export,
                         "export base + adapter as merged safetensors or GGUF (+ Ollama Modelfile)")
    exp.add_argument("--format", choices=("merged", "gguf"), required=True,
                     help="merged: safetensors for transformers / vLLM; gguf: llama.cpp / Ollama (llama family)")
    exp.add_argument("--output", required=True, help="folder to write")
    exp.add_argument("--gguf-type", choices=("f16", "q8_0"), default="f16", help="GGUF weight type (default f16)")
    exp.add_argument("--verify", action="store_true",
                     help="gguf: read the file back with transformers and print the logits difference")
    intr = adapter_action("intruders", cmd_adapters_intruders,
                          "intruder dimensions of an adapter (Shuttleworth et al. 2024)")
    intr.add_argument("--top-k", type=int, help="top singular vectors checked (default: intruder.INTRUDER_TOP_K, 10)")
    intr.add_argument("--epsilon", type=float,
                      help="similarity threshold (default: intruder.INTRUDER_EPSILON, 0.5)")
    comb = adapter_action("combine", cmd_adapters_combine, "weighted combination of several adapters into one",
                          adapter="several")
    comb.add_argument("--weights", help="comma-separated weights (default: equal)")
    comb.add_argument("--combination", choices=("cat", "linear"), default=None,
                      help="cat (exact for any ranks; default) or linear (equal ranks)")
    comb.add_argument("--output", required=True, help="folder for the combined adapter")
