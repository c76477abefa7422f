"""Adapters: generate with a base model and trained adapters, switch between them, combine them with weights,
merge one into the base and export it."""

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

gen, comb, merge = st.tabs(["Generate", "Combine", "Merge and export"])

with gen:
    prompt = st.text_area("Prompt", "What is 12 plus 7?", key="ad_prompt")
    c1, c2 = st.columns([1, 2])
    max_new = c1.number_input("New tokens", 1, 2048, 48, key="ad_max_new")
    mode = c2.radio("Answer with", ["the base and each adapter (switching adapters on one base)",
                                    "one adapter", "a weighted combination"], key="ad_mode")
    chosen = adapter_paths[0]
    weights = None
    if mode == "one adapter":
        chosen = st.selectbox("Adapter", adapter_paths, format_func=names.get, key="ad_one")
    elif mode == "a weighted combination":
        cols = st.columns(len(adapter_paths))
        weights = [cols[i].number_input(names[p], -4.0, 4.0, 1.0 / len(adapter_paths), 0.1, key=f"ad_gw{i}")
                   for i, p in enumerate(adapter_paths)]
    if st.button("Generate", type="primary", icon=":material/chat:", key="ad_generate"):
        ready()  # the background import of torch/transformers has finished
        from runner import adapters as ra

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
        cols = st.columns(len(adapter_paths))
        cw = [cols[i].number_input(names[p], -4.0, 4.0, 1.0 / len(adapter_paths), 0.1, key=f"ad_cw{i}")
              for i, p in enumerate(adapter_paths)]
        out_name = st.text_input("Name of the combined adapter", "combined", key="ad_comb_name")
        if st.button("Combine and save", icon=":material/merge:", key="ad_combine"):
            ready()  # the background import of torch/transformers has finished
            from runner import adapters as ra

            dest = home() / "exports" / safe_name(out_name, "combined")
            with st.spinner("Combining..."):
                saved, err = attempt(ra.combine, base, adapter_paths, cw, dest)
            if saved:
                st.success(f"Saved to `{saved}`. Add it above (one folder per line) to generate with it.")

with merge:
    st.write("Merge one adapter into the base weights (`merge_and_unload`) and save a standalone model "
             "(safetensors + tokenizer). QLoRA adapters are merged onto the full-precision base.")
    which = st.selectbox("Adapter to merge", adapter_paths, format_func=names.get, key="ad_merge_pick")
    out_name = st.text_input("Name of the merged model", safe_name(f"{names[which]}-merged"), key="ad_merge_name")
    if st.button("Merge and export", icon=":material/save:", key="ad_merge"):
        ready()  # the background import of torch/transformers has finished
        from runner import adapters as ra

        dest = home() / "exports" / safe_name(out_name, "merged")
        with st.spinner("Loading, merging and saving..."):
            saved, err = attempt(ra.merge, base, which, dest)
        if saved:
            size = sum(f.stat().st_size for f in Path(saved).glob("*.safetensors"))
            st.success(f"Merged model saved to `{saved}` ({fmt_bytes(size)} of weights). Use it as a model "
                       "folder anywhere, e.g. as the base of a new run.")
