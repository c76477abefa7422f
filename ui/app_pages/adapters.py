"""Adapters: the base and each adapter side by side on the same prompts, generate with one adapter or a weighted
combination, combine, merge and export (merged safetensors, GGUF + Ollama Modelfile, vLLM LoRA serving), and the
adapter's intruder dimensions on demand."""

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from ftcore.paths import home
from ui import jobs
from ui.errors import attempt
from ui.format import fmt_bytes
from ui.uploads import safe_name
from ui.warmup import ready

st.title("Adapters")
st.caption("Adapters from completed LoRA / QLoRA runs (or any folder with adapter_config.json and "
           "adapter_model.safetensors). Models load on this machine's CPU or GPU; small models take seconds.")
ss = st.session_state
#: Largest export offered as a browser download (bigger ones are shown by path only).
DOWNLOAD_MAX_BYTES = 2 * 2**30

runs = [r for r in jobs.manager().list() if r.status == "completed" and r.method in ("lora", "qlora")
        and (r.run_dir / "adapter" / "adapter_config.json").is_file()]
by_id = {r.id: r for r in runs}
labels = {r.id: f"{r.name or r.id} · r={r.spec.peft.r} · {r.id}" for r in runs}

st.subheader("Choose adapters")
picked = st.multiselect("From completed runs", list(by_id), format_func=labels.get, key="ad_runs",
                        default=list(by_id)[:1], persist_state="session")
extra = st.text_area("Or adapter folders, one per line", key="ad_extra", persist_state="session", height=68)
names = {str(by_id[i].run_dir / "adapter"): by_id[i].name or i for i in picked}
for line in (extra or "").splitlines():
    if line.strip():
        names.setdefault(line.strip(), Path(line.strip()).name)
adapter_paths = list(names)

default_base = by_id[picked[0]].spec.model if picked else ""
if ss.get("ad_base_for") != default_base:  # a new first run: use its base model
    ss["ad_base"] = default_base
    ss["ad_base_for"] = default_base
base = st.text_input("Base model (catalog id or model folder; the runs' own base by default)", key="ad_base")

if not adapter_paths or not base:
    st.info("Pick at least one adapter and a base model. Train one on the Launch page (LoRA or QLoRA).")
    st.stop()

rows = []
for p in adapter_paths:
    f = Path(p) / "adapter_model.safetensors"
    rows.append({"adapter": names[p], "folder": p, "size": fmt_bytes(f.stat().st_size) if f.is_file() else "missing"})
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")



def pick_adapter(label: str, key: str) -> str:
    """One of the chosen adapters (its folder), shown by its run name; each tab keeps its own choice (``key``)."""
    return st.selectbox(label, adapter_paths, format_func=names.get, key=key)


def adapter_weights(key_prefix: str) -> list[float]:
    """A weight per chosen adapter, side by side (1 / count each by default); keys ``<key_prefix><index>``."""
    cols = st.columns(len(adapter_paths))
    return [cols[i].number_input(names[p], -4.0, 4.0, 1.0 / len(adapter_paths), 0.1, key=f"{key_prefix}{i}")
            for i, p in enumerate(adapter_paths)]


gen, side, comb, merge, exp, intr = st.tabs(["Generate", "Base vs tuned", "Combine", "Merge", "Export",
                                             "Intruder dimensions"])

with side:
    st.write("The same prompts through the base model (every adapter off) and through each adapter, one loaded "
             "base with the adapters switched. The first column is always the base.")
    prompts_text = st.text_area("Prompts, one per line", "What is 12 plus 7?\nWrite one sentence about the sea.",
                                key="ad_cmp_prompts", height=90)
    cmp_new = st.number_input("New tokens", 1, 2048, 48, key="ad_cmp_new")
    if st.button("Compare", type="primary", icon=":material/compare:", key="ad_compare"):
        ready()  # the background import of torch/transformers has finished
        from runner.tools import adapters as ra

        t0 = time.perf_counter()
        with st.spinner("Loading the base and the adapters, then generating..."):
            res, err = attempt(ra.generate_compare, base, adapter_paths, prompts_text.splitlines(),
                               max_new_tokens=int(cmp_new))
        if res:
            ss["ad_cmp_result"] = (res, time.perf_counter() - t0)
    if ss.get("ad_cmp_result"):
        res, secs = ss["ad_cmp_result"]
        labels_shown = [c["label"] if c["kind"] == "base" else "adapter: " + names.get(c["path"], c["label"][9:])
                        for c in res["columns"]]
        for row in res["rows"]:
            st.markdown(f"**Prompt:** {row['prompt']}")
            cols = st.columns(len(res["columns"]))
            for col, label, out in zip(cols, labels_shown, row["outputs"]):
                with col.container(border=True):
                    st.markdown(f"**{label}**")
                    st.text(out)
        st.caption(f"{secs:.1f} s including loading the model. Greedy decoding: the same prompt gives the same "
                   "answer each time.")

with gen:
    prompt = st.text_area("Prompt", "What is 12 plus 7?", key="ad_prompt")
    c1, c2 = st.columns([1, 2])
    max_new = c1.number_input("New tokens", 1, 2048, 48, key="ad_max_new")
    mode = c2.radio("Answer with", ["the base and each adapter (switching adapters on one base)",
                                    "one adapter", "a weighted combination"], key="ad_mode")
    chosen = adapter_paths[0]
    weights = None
    if mode == "one adapter":
        chosen = pick_adapter("Adapter", "ad_one")
    elif mode == "a weighted combination":
        weights = adapter_weights("ad_gw")
    if st.button("Generate", type="primary", icon=":material/chat:", key="ad_generate"):
        ready()  # the background import of torch/transformers has finished
        from runner.tools import adapters as ra

        t0 = time.perf_counter()
        with st.spinner("Loading the base and the adapters, then generating..."):
            if mode.startswith("the base"):
                out, err = attempt(ra.generate_each, base, adapter_paths, prompt, max_new_tokens=int(max_new))
                result = {("base model" if k == "base" else names.get(k, k)): v for k, v in (out or {}).items()}
            elif mode == "one adapter":
                out, err = attempt(ra.generate, base, [chosen], prompt, max_new_tokens=int(max_new))
                result = {names[chosen]: out} if out is not None else {}
            else:
                out, err = attempt(ra.generate, base, adapter_paths, prompt, weights=weights,
                                   max_new_tokens=int(max_new))
                result = {"weighted combination": out} if out is not None else {}
        if result:
            ss["ad_result"] = (result, time.perf_counter() - t0)
    if ss.get("ad_result"):
        result, secs = ss["ad_result"]
        for who, text in result.items():
            with st.container(border=True):
                st.markdown(f"**{who}**")
                st.text(text)
        st.caption(f"{secs:.1f} s including loading the model.")

with comb:
    st.write("A new adapter whose update is the weighted sum of the chosen adapters' updates (peft "
             "`add_weighted_adapter`).")
    if len(adapter_paths) < 2:
        st.info("Pick two or more adapters to combine.")
    else:
        cw = adapter_weights("ad_cw")
        out_name = st.text_input("Name of the combined adapter", "combined", key="ad_comb_name")
        if st.button("Combine and save", icon=":material/merge:", key="ad_combine"):
            ready()  # the background import of torch/transformers has finished
            from runner.tools import adapters as ra

            dest = home() / "exports" / safe_name(out_name, "combined")
            with st.spinner("Combining..."):
                saved, err = attempt(ra.combine, base, adapter_paths, cw, dest)
            if saved:
                st.success(f"Saved to `{saved}`. Add it above (one folder per line) to generate with it.")

with merge:
    st.write("Merge one adapter into the base weights (`merge_and_unload`) and save a standalone model "
             "(safetensors + tokenizer). QLoRA adapters are merged onto the full-precision base.")
    which = pick_adapter("Adapter to merge", "ad_merge_pick")
    out_name = st.text_input("Name of the merged model", safe_name(f"{names[which]}-merged"), key="ad_merge_name")
    if st.button("Merge and export", icon=":material/save:", key="ad_merge"):
        ready()  # the background import of torch/transformers has finished
        from runner.tools import adapters as ra

        dest = home() / "exports" / safe_name(out_name, "merged")
        with st.spinner("Loading, merging and saving..."):
            saved, err = attempt(ra.merge, base, which, dest)
        if saved:
            size = sum(f.stat().st_size for f in Path(saved).glob("*.safetensors"))
            st.success(f"Merged model saved to `{saved}` ({fmt_bytes(size)} of weights). Use it as a model "
                       "folder anywhere, e.g. as the base of a new run.")

with exp:
    st.write("Export base + adapter for serving. **merged**: a safetensors folder (tokenizer, chat template, "
             "generation config) for transformers or `vllm serve`; **gguf**: one .gguf file (llama family: Llama, "
             "Mistral, Qwen2) with the tokenizer and chat template inside, plus an Ollama `Modelfile`. Or serve the "
             "adapter as it is with vLLM's LoRA support (the command is shown after an export).")
    which_e = pick_adapter("Adapter to export", "ad_exp_pick")
    e1, e2, e3 = st.columns(3)
    fmt = e1.radio("Format", ["merged", "gguf"], key="ad_exp_fmt", horizontal=True)
    gtype = e2.radio("GGUF weights", ["f16", "q8_0"], key="ad_exp_gtype", horizontal=True, disabled=fmt != "gguf")
    verify = e3.checkbox("Read the GGUF back and compare logits", key="ad_exp_verify", disabled=fmt != "gguf",
                         help="loads the file with transformers' GGUF reader (about a minute for a 135M model)")
    exp_name = st.text_input("Name of the export", safe_name(f"{names[which_e]}-{fmt}"),
                             key=f"ad_exp_name_{fmt}")  # one box per format, so the default follows the format
    if st.button("Export", icon=":material/ios_share:", key="ad_export"):
        ready()
        from runner.tools import adapters as ra

        dest = home() / "exports" / safe_name(exp_name, "export")
        with st.spinner("Merging and writing..."):
            res, err = attempt(ra.export, base, which_e, fmt, dest, gguf_type=gtype, verify=verify and fmt == "gguf")
        if res:
            ss["ad_exp_result"] = res
    if ss.get("ad_exp_result"):
        res = ss["ad_exp_result"]
        st.success(f"{res['format']} export in `{res['output']}` ({fmt_bytes(res['bytes'])}): "
                   + ", ".join(f"`{f}`" for f in res["files"]))
        if "roundtrip" in res:
            rt = res["roundtrip"]
            st.info(f"Read back by transformers' GGUF reader: largest logit difference {rt['max_abs_diff']:.2e} "
                    f"(largest logit {rt['max_abs_logit']:.1f}); the same top token at "
                    f"{rt['argmax_agreement']:.0%} of positions.")
        out = Path(res["output"])
        target = out / f"{out.name}.gguf" if res["format"] == "gguf" else None
        if target is not None and target.is_file() and target.stat().st_size <= DOWNLOAD_MAX_BYTES:
            with open(target, "rb") as fh:
                st.download_button(f"Download {target.name}", fh, file_name=target.name, key="ad_exp_dl",
                                   icon=":material/download:")
        elif res["format"] == "merged":
            zipped = out.with_suffix(".zip")
            if res["bytes"] <= DOWNLOAD_MAX_BYTES:
                if not zipped.is_file():
                    import shutil

                    shutil.make_archive(str(out), "zip", out)
                with open(zipped, "rb") as fh:
                    st.download_button(f"Download {zipped.name}", fh, file_name=zipped.name, key="ad_exp_dl",
                                       icon=":material/download:")
        st.markdown("**Serve it**")
        st.code(res["serve"], language="bash", wrap_lines=True)
        st.markdown("**Or serve the adapter as it is with vLLM** (one base, adapters loaded per request)")
        st.code(res["vllm_lora"]["command"], language="bash", wrap_lines=True)

with intr:
    st.write("Intruder dimensions (Shuttleworth et al. 2024, arXiv:2410.21228): for each adapted weight, the top "
             "singular vectors of W + delta W that resemble no singular vector of the base W. LoRA tends to "
             "introduce them, full fine-tuning does not; they go with forgetting. Read from the files, no model "
             "is loaded.")
    which_i = pick_adapter("Adapter", "ad_intr_pick")
    if st.button("Measure", icon=":material/query_stats:", key="ad_intr"):
        ready()
        from runner.tools import intruder

        with st.spinner("Two SVDs per adapted module..."):
            rep, err = attempt(intruder.adapter_intruders, base, which_i)
        if rep:
            ss["ad_intr_result"] = (names[which_i], rep)  # an IntruderReport
    if ss.get("ad_intr_result"):
        label, rep = ss["ad_intr_result"]
        from runner.tools.intruder import layer_min_cos, per_layer
        from ui import charts

        s = rep.summary
        m1, m2, m3 = st.columns(3)
        m1.metric("Intruder dimensions", s.total)
        m2.metric("Modules with intruders", f"{s.modules_with_intruders} of {s.modules}")
        m3.metric("Per module", f"{s.mean_per_module:.2f}")
        st.plotly_chart(charts.intruder_bars({label: per_layer(rep)}, rep.top_k, rep.epsilon,
                                             {label: layer_min_cos(rep)}), key="ad_intr_chart")
        st.dataframe(pd.DataFrame([{"module": m.module, "intruders": m.intruders,
                                    "lowest max |cos|": min(m.max_cos), "||dW|| / ||W||": m.delta_norm_ratio}
                                   for m in rep.per_module]), hide_index=True, width="stretch")
