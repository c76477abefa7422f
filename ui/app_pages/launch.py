"""Launch: the run spec in a form (from the advisor or from scratch), the dataset check, the estimate for this
exact spec, and one button that starts a durable training job."""

import json
import statistics
import time
from pathlib import Path

import pandas as pd
import streamlit as st
from pydantic import ValidationError

from estimator.request import TARGET_PRESETS
from ftcore.errors import UserError
from runner.errors import RunnerError
from runner.models import Download, check_model_available, hub_cache_dir, hub_offline
from runner.spec import DatasetSpec, RunSpec
from ui import charts, datasets, estimates, jobs, state, uploads
from ui.errors import attempt, message_of
from ui.format import fmt_bytes, fmt_hours, fmt_usd
from ui.nav import page_file

SESSION = "session"  # widget values survive page switches
STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]
DS_SOURCES = ["Shipped sample", "Upload", "Local path"]

st.title("Launch")


@st.cache_data(ttl=30, show_spinner=False)  # re-checked every 30 s: a snapshot fetched in a terminal shows up
def _model_status(ref: str, hub_cache: str, offline: bool):
    """(ResolvedModel, None) when the run can get the model, else (None, the refusal with its fix). The hub
    cache folder and the offline flag are part of the cache key."""
    try:
        return check_model_available(ref), None
    except RunnerError as exc:
        return None, f"{exc}. Fix: {exc.fix}" if exc.fix else str(exc)


# ---- fill the form from a handed-over spec (once per hand-over) ---------------------------------------------
shipped = datasets.shipped()
handed = st.session_state.get(state.LAUNCH_SPEC)
if handed is None:
    first = str(shipped[0]) if shipped else ""
    handed = RunSpec(model="smollm2-135m", dataset=DatasetSpec(path=first)).model_dump(mode="json")
token = json.dumps(handed, sort_keys=True)
if st.session_state.get(state.LAUNCH_LOADED) != token:
    p, d, ds = handed, handed["distribution"], handed["dataset"]
    peft = p["peft"]
    targets = peft["target_modules"]
    values = {
        "ln_name": "", "ln_model": p["model"], "ln_method": p["method"],
        "ln_variant": peft["variant"], "ln_r": peft["r"], "ln_alpha": float(peft["alpha"]),
        "ln_dropout": float(peft["dropout"]), "ln_rslora": peft["use_rslora"], "ln_dora": peft["use_dora"],
        "ln_targets": targets if isinstance(targets, str) else ",".join(targets),
        "ln_opt": p["optimizer"], "ln_lr": float(p["learning_rate"]), "ln_sched": p["lr_scheduler"],
        "ln_warmup": float(p["warmup_ratio"]), "ln_epochs": float(p["epochs"]), "ln_max_steps": p["max_steps"] or 0,
        "ln_mb": p["micro_batch_size"], "ln_ga": p["gradient_accumulation_steps"], "ln_seq": p["seq_len"],
        "ln_gc": p["gradient_checkpointing"], "ln_prec": p["precision"], "ln_attn": p["attention"],
        "ln_master": p.get("master_dtype", "fp32"), "ln_qregime": p.get("qlora_regime", "paper"),
        "ln_save": p["save_steps"], "ln_eval": p["eval_steps"] or 0, "ln_seed": p["seed"], "ln_device": p["device"],
        "ln_nproc": d["nproc_per_node"], "ln_nnodes": d["nnodes"], "ln_strategy": d["strategy"],
        "ln_offload": d["offload"], "ln_launcher": d["launcher"], "ln_trust": p.get("trust_remote_code", False),
        "ln_ds_format": ds["format"], "ln_ds_eval": float(ds["eval_fraction"]), "ln_ds_pack": ds["packing"],
        "ln_ds_completion": ds["completion_only_loss"],
    }
    path = ds.get("path") or ""
    if path in {str(f) for f in shipped}:
        values.update(ln_ds_src="Shipped sample", ln_ds_shipped=path)
    elif path:
        values.update(ln_ds_src="Local path", ln_ds_path=path)
    else:
        values.update(ln_ds_src="Upload" if not shipped else "Shipped sample")
    for k, v in values.items():
        st.session_state[k] = v
    st.session_state[state.LAUNCH_LOADED] = token

source = st.session_state.get(state.LAUNCH_SOURCE)
top = st.columns([3, 1])
if source:
    top[0].info(f"Filled from the {source}. Edit anything before launching.", icon=":material/assignment:")
if top[1].button("Start from scratch", icon=":material/restart_alt:"):
    st.session_state.pop(state.LAUNCH_SPEC, None)
    st.session_state.pop(state.LAUNCH_SOURCE, None)
    st.rerun()

form, side = st.columns([1.2, 1], gap="large")

# ---- the spec ---------------------------------------------------------------------------------------------
with form:
    st.subheader("Model and method")
    c1, c2 = st.columns([2, 1])
    c1.text_input("Model: catalog id (e.g. smollm2-135m), hub id or a local model folder", key="ln_model",
                  persist_state=SESSION)
    c2.text_input("Run name (empty: method, model, rank)", key="ln_name", persist_state=SESSION)
    method = st.segmented_control("Method", ["full", "lora", "qlora"], required=True, key="ln_method",
                                  persist_state=SESSION, format_func=estimates.METHOD_LABELS.get)
    adapter = method != "full"
    with st.expander("Adapter settings", expanded=adapter):
        c1, c2, c3, c4 = st.columns(4)
        c1.selectbox("Variant", ["lora", "loraplus", "adalora"], key="ln_variant", persist_state=SESSION,
                     disabled=not adapter)
        c2.number_input("Rank r", 1, 1024, key="ln_r", persist_state=SESSION, disabled=not adapter)
        c3.number_input("alpha", 0.1, 4096.0, key="ln_alpha", persist_state=SESSION, disabled=not adapter)
        c4.number_input("dropout", 0.0, 0.99, step=0.05, key="ln_dropout", persist_state=SESSION,
                        disabled=not adapter)
        c1, c2, c3 = st.columns([2, 1, 1])
        c1.selectbox("Target modules (preset, or type names separated by commas)", TARGET_PRESETS,
                     accept_new_options=True, key="ln_targets", persist_state=SESSION, disabled=not adapter)
        c2.toggle("rsLoRA", key="ln_rslora", persist_state=SESSION, disabled=not adapter)
        c3.toggle("DoRA", key="ln_dora", persist_state=SESSION, disabled=not adapter)

    st.subheader("Training")
    c1, c2, c3, c4 = st.columns(4)
    c1.selectbox("Optimizer", ["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"], key="ln_opt",
                 persist_state=SESSION)
    c2.number_input("Learning rate", 1e-7, 0.99, format="%.2e", step=1e-5, key="ln_lr", persist_state=SESSION)
    c3.selectbox("Schedule", ["cosine", "linear", "constant", "constant_with_warmup"], key="ln_sched",
                 persist_state=SESSION)
    c4.number_input("Warmup ratio", 0.0, 0.99, step=0.01, key="ln_warmup", persist_state=SESSION)
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Epochs", 0.01, 1000.0, step=1.0, key="ln_epochs", persist_state=SESSION)
    c2.number_input("Max steps (0 = by epochs)", 0, 10_000_000, key="ln_max_steps", persist_state=SESSION)
    c3.number_input("Micro-batch", 1, 4096, key="ln_mb", persist_state=SESSION)
    c4.number_input("Grad. accumulation", 1, 65536, key="ln_ga", persist_state=SESSION)
    c1, c2, c3, c4 = st.columns(4)
    c1.number_input("Sequence length", 8, 1_048_576, step=64, key="ln_seq", persist_state=SESSION)
    c2.selectbox("Precision", ["bf16", "fp16", "fp32"], key="ln_prec", persist_state=SESSION)
    c3.selectbox("Attention", ["sdpa", "eager"], key="ln_attn", persist_state=SESSION)
    c4.selectbox("Device", ["auto", "cpu", "cuda"], key="ln_device", persist_state=SESSION)
    c1, c2 = st.columns(2)
    c1.selectbox("Master weights (full fine-tuning)", ["fp32", "bf16", "fp16"], key="ln_master",
                 persist_state=SESSION, help="fp32: mixed precision with fp32 master weights; bf16/fp16: pure 16-bit "
                                            "(weights, gradients and AdamW states), equal to Precision")
    c2.selectbox("QLoRA regime", ["paper", "peft-upcast"], key="ln_qregime", persist_state=SESSION,
                 help="paper: norms fp32, the rest in the compute dtype; peft-upcast: every non-quantized weight fp32")
    c1, c2, c3 = st.columns(3)
    c1.number_input("Checkpoint every N steps", 1, 10_000_000, key="ln_save", persist_state=SESSION)
    c2.number_input("Eval every N steps (0 = per epoch)", 0, 10_000_000, key="ln_eval", persist_state=SESSION)
    c3.number_input("Seed", 0, 2**31 - 1, key="ln_seed", persist_state=SESSION)
    st.toggle("Gradient checkpointing (recompute activations: less memory, slower steps)", key="ln_gc",
              persist_state=SESSION)

    st.subheader("Processes")
    c1, c2, c3 = st.columns(3)
    c1.number_input("GPUs (processes) per node", 1, 64, key="ln_nproc", persist_state=SESSION)
    c2.number_input("Nodes", 1, 4096, key="ln_nnodes", persist_state=SESSION)
    c3.selectbox("Launcher", ["torchrun", "accelerate"], key="ln_launcher", persist_state=SESSION)

    trust = st.checkbox("Allow the model's own code from the hub (trust_remote_code)", key="ln_trust",
                        persist_state=SESSION)
    if trust:
        st.warning("This runs Python code shipped with the model, with your permissions. Only for models whose "
                   "code you have read and trust.", icon=":material/warning:")

    st.subheader("Dataset")
    ds_src = st.segmented_control("Dataset from", DS_SOURCES, required=True,
                                  key="ln_ds_src", persist_state=SESSION)
    ds_box = st.container()
    ds_path = None
    if ds_src == "Shipped sample":
        if shipped:
            ds_path = st.selectbox("Sample dataset (data/datasets/)", [str(p) for p in shipped], key="ln_ds_shipped",
                                   persist_state=SESSION, format_func=lambda s: s.split("/data/datasets/")[-1])
        else:
            st.info("No sample datasets are shipped yet; upload one or give a path.")
    elif ds_src == "Upload":
        up = st.file_uploader("JSONL, CSV or Parquet (kept under the app's data folder, never executed)",
                              type=[s.lstrip(".") for s in uploads.DATASET_SUFFIXES], key="ln_ds_upload")
        if up is not None:
            saved, _ = attempt(uploads.save_upload, up.getvalue(), up.name, kind="datasets",
                               max_bytes=uploads.MAX_DATASET_BYTES, suffixes=uploads.DATASET_SUFFIXES, where=ds_box)
            if saved:
                st.session_state["ln_ds_uploaded"] = str(saved)
        ds_path = st.session_state.get("ln_ds_uploaded")
        if ds_path:
            st.caption(f"Stored as `{ds_path}`")
    else:
        ds_path = st.text_input("Path to a JSONL, CSV or Parquet file", key="ln_ds_path", persist_state=SESSION) or None
    c1, c2 = st.columns(2)
    c1.selectbox("Format", ["auto", "text", "prompt_completion", "messages"], key="ln_ds_format",
                 persist_state=SESSION)
    c2.number_input("Eval share", 0.0, 0.9, step=0.05, key="ln_ds_eval", persist_state=SESSION)
    c1, c2 = st.columns(2)
    c1.toggle("Packing", key="ln_ds_pack", persist_state=SESSION)
    c2.toggle("Loss on completions only", key="ln_ds_completion", persist_state=SESSION)

ss = st.session_state
targets_raw = str(ss["ln_targets"] or "attention-qv").strip()
targets_val = targets_raw if targets_raw in TARGET_PRESETS else [t.strip() for t in targets_raw.split(",") if t.strip()]
model_ref = ss["ln_model"].strip()
auto_name = f"{method} {Path(model_ref).name or model_ref}" + (f" r={ss['ln_r']}" if method != "full" else "")
spec_dict = {
    "name": ss["ln_name"].strip() or auto_name, "model": model_ref, "method": method,
    "peft": {"variant": ss["ln_variant"], "r": ss["ln_r"], "alpha": ss["ln_alpha"], "dropout": ss["ln_dropout"],
             "target_modules": targets_val, "use_rslora": ss["ln_rslora"], "use_dora": ss["ln_dora"]},
    "optimizer": ss["ln_opt"], "learning_rate": ss["ln_lr"], "lr_scheduler": ss["ln_sched"],
    "warmup_ratio": ss["ln_warmup"], "epochs": ss["ln_epochs"], "max_steps": ss["ln_max_steps"] or None,
    "micro_batch_size": ss["ln_mb"], "gradient_accumulation_steps": ss["ln_ga"], "seq_len": ss["ln_seq"],
    "gradient_checkpointing": ss["ln_gc"], "precision": ss["ln_prec"], "attention": ss["ln_attn"],
    "master_dtype": ss.get("ln_master", "fp32"), "qlora_regime": ss.get("ln_qregime", "paper"),
    "save_steps": ss["ln_save"], "eval_steps": ss["ln_eval"] or None, "seed": ss["ln_seed"],
    "device": ss["ln_device"], "trust_remote_code": trust,
    "distribution": {"nproc_per_node": ss["ln_nproc"], "nnodes": ss["ln_nnodes"],
                     "strategy": ss.get("ln_strategy", "ddp"), "offload": ss.get("ln_offload", False),
                     "launcher": ss["ln_launcher"]},
    "dataset": {"path": ds_path or "", "format": ss["ln_ds_format"], "eval_fraction": ss["ln_ds_eval"],
                "packing": ss["ln_ds_pack"], "completion_only_loss": ss["ln_ds_completion"]},
}

# ---- checks, estimate, launch ------------------------------------------------------------------------------
with side:
    st.subheader("Check")
    spec, _ = attempt(RunSpec.model_validate, spec_dict)
    report = None
    model_ready = False  # the model check: the same resolution the worker uses (runner.models), before the button
    if spec is not None:
        avail, model_err = _model_status(spec.model, str(hub_cache_dir()), hub_offline())
        if model_err:
            st.error(f"**model**: {model_err}", icon=":material/block:")
        elif avail.ready or avail.kind == "demo":  # the demo converts on first use (in the dataset check)
            model_ready = True
            st.success(f"Model: {avail.describe()}", icon=":material/check_circle:")
        else:
            st.info(f"Model: {avail.describe()}. The dataset check needs its tokenizer, so download it first.",
                    icon=":material/download:")
            if st.button("Download the model", icon=":material/download:", key="ln_download"):
                bar = st.progress(0.0, text=f"Downloading {avail.hub_id}...")
                job = Download(spec.model).start()
                while not job.finished:
                    bar.progress(job.fraction, text=f"{avail.hub_id}: {fmt_bytes(job.done_bytes)} of "
                                                    f"{fmt_bytes(job.total_bytes or avail.download_bytes)}")
                    time.sleep(0.5)
                _model_status.clear()
                if job.error is not None:
                    st.error(f"**model**: {message_of(job.error)}", icon=":material/error:")
                else:
                    st.rerun()
    if model_ready and not ds_path:
        st.warning("Choose a dataset.")
    elif model_ready:
        with st.spinner("Reading the dataset with the model's tokenizer (the demo model converts once, ~1 min)..."):
            report, ds_err = attempt(datasets.check, spec.dataset.model_dump_json(), spec.model, spec.seq_len,
                                     datasets.mtime_ns(spec.dataset.path), spec.trust_remote_code)
        if report is not None:
            lengths = report.token_lengths
            st.markdown(f"Format: **{report.format or 'unknown'}**")
            k1, k2, k3 = st.columns(3)
            k1.metric("Rows", f"{report.rows:,}")
            k2.metric("Truncated", f"{report.truncated_share:.0%}", help=f"rows longer than {spec.seq_len} tokens")
            k3.metric("Trained tokens", f"{report.trained_tokens:,}", help="tokens with a loss, after truncation")
            if lengths:
                st.plotly_chart(charts.token_histogram(lengths, spec.seq_len), key="tok_hist")
            if report.errors:
                st.error(f"{len(report.errors)} problem(s) in the dataset; fix them before launching.")
                st.dataframe(pd.DataFrame([{"row": e.row, "column": e.column or "", "problem": e.message}
                                           for e in report.errors]), hide_index=True, width="stretch")
            for w in report.warnings:
                st.warning(w)
            if report.samples:  # what carries a loss in the first rows (the masks as the run builds them)
                with st.expander("What is trained (first rows)"):
                    st.dataframe(pd.DataFrame([{"row": s.row, "trained text": s.trained_text}
                                               for s in report.samples]), hide_index=True, width="stretch")

    st.subheader("Will it fit?")
    gpu_list = estimates.gpus()
    gpu_ids = [g.id for g in gpu_list]
    names = {g.id: f"{g.name} ({fmt_bytes(g.memory_bytes)})" for g in gpu_list}
    if state.LAUNCH_GPU in ss and ss[state.LAUNCH_GPU] in gpu_ids and "ln_gpu" not in ss:
        ss["ln_gpu"] = ss[state.LAUNCH_GPU]
    if "ln_gpu" not in ss and gpu_ids:
        ss["ln_gpu"] = "a100-80gb" if "a100-80gb" in gpu_ids else gpu_ids[0]
    gpu_id = st.selectbox("GPU the run is sized for", gpu_ids, format_func=names.get, key="ln_gpu",
                          persist_state=SESSION)
    fits = True
    if spec is not None and gpu_id:
        from runner.estimate_request import estimate_request

        data_fields = {}
        if report is not None and report.rows and report.token_lengths:  # rows are truncated to seq_len
            data_fields = {"examples": report.rows, "tokens_per_example": max(1, int(statistics.mean(
                min(n, spec.seq_len) for n in report.token_lengths)))}
        world = spec.distribution.world_size
        if world > 1:
            st.caption(f"{world} processes: pick how they share the model (peak memory per GPU shown).")
            per = {}
            for s in STRATEGIES:
                trial = spec.model_copy(update={"distribution": spec.distribution.model_copy(update={"strategy": s})})
                try:
                    e = estimates.estimate(estimate_request(trial, gpu=gpu_id, **data_fields))
                    per[s] = f"{s}: {fmt_bytes(e.memory.peak_bytes)} per GPU ({'fits' if e.fits else 'does not fit'})"
                except (UserError, ValidationError) as exc:
                    per[s] = f"{s}: {message_of(exc)}"
            st.radio("Strategy", STRATEGIES, key="ln_strategy", persist_state=SESSION, format_func=per.get)
            st.toggle("CPU offload", key="ln_offload", persist_state=SESSION)
            spec = spec.model_copy(update={"distribution": spec.distribution.model_copy(
                update={"strategy": ss["ln_strategy"], "offload": ss["ln_offload"]})})
        req, err = attempt(estimate_request, spec, gpu=gpu_id, **data_fields)
        est = None
        if req is not None:
            with st.spinner("Estimating..."):
                est, err = attempt(estimates.estimate, req)
        if est is not None:
            fits = est.fits
            msg = (f"peak {fmt_bytes(est.memory.peak_bytes)} of {fmt_bytes(est.gpu.memory_bytes)} per GPU "
                   f"on {est.gpu.count} x {est.gpu.name} (peak during {est.memory.peak_phase})")
            if fits:
                st.success("Fits: " + msg, icon=":material/check_circle:")
            elif failing := est.failing_phase():  # the step fits; loading or evaluation does not
                phase, peak = failing
                st.error(f"Will not fit during {phase}: {fmt_bytes(peak)} on the card (the step itself: {msg}).",
                         icon=":material/block:")
            else:
                st.error("Will not fit: " + msg + ". Lower the micro-batch or sequence length, turn on gradient "
                         "checkpointing, switch to QLoRA, or add GPUs with zero3/fsdp.", icon=":material/block:")
            if est.compute and est.compute.hours is not None:
                st.caption(f"On that GPU: about {fmt_hours(est.compute.hours)}, {fmt_usd(est.compute.cost_usd)}.")

    st.subheader("Launch")
    blocked = spec is None or not model_ready or not ds_path or report is None or bool(report.errors)
    anyway = True
    if not fits:
        anyway = st.checkbox("Launch anyway (for example, this machine is not the GPU above)", key="ln_anyway")
    if st.button("Launch", type="primary", disabled=blocked or not anyway, icon=":material/rocket_launch:",
                 key="ln_launch"):
        with st.spinner("Starting the job..."):
            rec, err = attempt(jobs.manager().launch, spec)
        if rec is not None:
            ss[state.SELECTED_RUN] = rec.id
            ss[state.LAUNCHED_RUN] = rec.id
    last = ss.get(state.LAUNCHED_RUN)
    if last:
        st.success(f"Run `{last}` launched. It keeps running if you close the browser.", icon=":material/check:")
        if st.button("Watch it on the Runs page", icon=":material/monitoring:", key="ln_goto_runs"):
            st.switch_page(page_file("runs"))

    if spec is not None:
        st.caption("The same from a terminal (save the spec first):")
        st.code("ftadvisor run spec.json --detach", language="bash")
        spec_json = json.dumps(spec.model_dump(mode="json"), indent=2)
        st.download_button("Download spec.json", spec_json, file_name="spec.json", mime="application/json",
                           icon=":material/download:")
        with st.expander("spec.json"):
            st.code(spec_json, language="json")
