"""Estimate: will this model fit, with which method, on which GPUs, for how long and at what cost.

Every knob is bound to the URL query string, so the address bar is a shareable link to this estimate.
"""

import json

import streamlit as st

# The title goes on screen before the imports below: opened while the warm-up thread imports torch (which holds
# the GIL), importing the estimator's package and plotly took seconds, and the page stayed blank meanwhile.
st.title("Estimate")
st.caption("Exact parameter counts and per-GPU memory from the real architecture (meta model + traced "
           "activations); time and cost from FLOPs. The URL holds every knob: copy it to share this estimate.")

from pydantic import ValidationError  # noqa: E402

from estimator.notes import LOAD_WHY  # noqa: E402
from estimator.request import EXPERTS_PRESET, TARGET_PRESETS, EstimateRequest  # noqa: E402
from ftcore.errors import UserError  # noqa: E402
from ui import estimates, figures, uploads  # noqa: E402
from ui.errors import attempt, message_of  # noqa: E402
from ui.format import fmt_bytes, fmt_flops, fmt_hours, fmt_params, fmt_usd  # noqa: E402
from ui.lazy import pandas as pd  # noqa: E402  (pandas loads at the first table, not when the page starts)
from ui.report import estimate_cli, estimate_csv, estimate_markdown, estimate_rows  # noqa: E402

RANKS = [4, 8, 16, 32, 64, 128, 256]  # the seed's rank guide spans 4-256 ("Comparing LoRA ranks")
SOURCES = ["Catalog", "Upload", "Folder", "Hub"]  # where the model comes from (short: they go in the URL)
QP = "query-params"

model_names = estimates.model_names()
model_ids = list(model_names)
gpu_list = estimates.gpus()
gpu_ids = [g.id for g in gpu_list]
gpu_by_id = {g.id: g for g in gpu_list}

inputs, results = st.columns([1.2, 2], gap="large")

# ---- inputs -------------------------------------------------------------------------------------------------
with inputs:
    st.subheader("Model")
    source = st.segmented_control("Model from", SOURCES, default="Catalog", required=True, key="src", bind=QP,
                                  width="stretch")
    model_ref = None
    model_box = st.container()
    if source == "Catalog":
        default_model = "llama-3.1-8b" if "llama-3.1-8b" in model_ids else (model_ids[0] if model_ids else None)
        # Options are the bare ids (no format_func): a bound widget writes its label into the URL, and an id
        # keeps shared links short and readable (?model=llama-3.1-70b).
        model_ref = st.selectbox("Catalog model (type to search)", model_ids,
                                 index=model_ids.index(default_model) if default_model else 0, key="model", bind=QP)
        st.caption(model_names.get(model_ref, ""))
    elif source == "Upload":
        up = st.file_uploader("Hugging Face config.json", type=["json"], key="config_upload",
                              max_upload_size=1)
        if up is not None:
            path, _ = attempt(uploads.save_config_upload, up.getvalue(), where=model_box)
            model_ref = str(path) if path else None
        st.caption("An uploaded config is not part of the shareable link; use a catalog id for that.")
    elif source == "Folder":
        model_ref = st.text_input("Path to a model folder or config.json", key="path", bind=QP,
                                  placeholder="/models/my-llama") or None
    else:
        model_ref = st.text_input("Hub id (needs network)", key="hub", bind=QP,
                                  placeholder="meta-llama/Llama-3.1-8B") or None
        st.caption("Offline, the estimator says so and suggests close catalog matches.")

    st.subheader("Method")
    method = st.segmented_control("Method", list(estimates.METHODS), default="lora", required=True, key="method",
                                  bind=QP)
    is_adapter = method != "full"
    with st.container(border=True):
        c1, c2 = st.columns(2)
        rank = c1.select_slider("LoRA rank r", RANKS + [512, 1024], value=16, key="r", bind=QP,
                                disabled=not is_adapter)
        alpha = c2.number_input("alpha (0 = 2 x r)", min_value=0.0, value=0.0, step=1.0, key="alpha", bind=QP,
                                disabled=not is_adapter)
        c1, c2 = st.columns([2, 1])
        targets = c1.selectbox("Target modules", TARGET_PRESETS, key="targets", bind=QP, disabled=not is_adapter,
                               help="attention-qv: q and v projections (the LoRA paper); all-linear: every Linear; "
                                    "all-linear+experts: also the routed experts of an MoE (LoRA only, dropout 0)")
        dropout = c2.number_input("dropout", min_value=0.0, max_value=0.95, step=0.05, key="dropout", bind=QP,
                                  value=EstimateRequest.model_fields["dropout"].default, disabled=not is_adapter,
                                  help="lora_dropout: its mask is an activation too")
        c1, c2 = st.columns(2)
        dora = c1.toggle("DoRA", key="dora", bind=QP, disabled=not is_adapter)
        rslora = c2.toggle("rsLoRA", key="rslora", bind=QP, disabled=not is_adapter)

    st.subheader("Training step")
    c1, c2 = st.columns(2)
    dtype = c1.selectbox("Precision", ["bf16", "fp16", "fp32"], key="dtype", bind=QP)
    optimizer = c2.selectbox("Optimizer", ["adamw", "adamw-8bit", "paged-adamw-8bit", "sgd", "adafactor"],
                             key="opt", bind=QP)
    c1, c2 = st.columns(2)
    regime = c1.selectbox("Full fine-tuning regime", ["fp32 master weights", "pure 16-bit"], key="regime",
                          bind=QP, disabled=method != "full" or dtype == "fp32",
                          help="fp32 master weights with 16-bit autocast (mixed precision), or pure 16-bit: "
                               "weights, gradients and AdamW states in the precision above (torchtune, TRL with "
                               "a bf16 model, LLaMA-Factory pure_bf16). --master-dtype on the command line.")
    qlora_regime = c2.selectbox("QLoRA regime", ["paper", "peft-upcast"], key="qregime", bind=QP,
                                disabled=method != "qlora",
                                help="paper: norms fp32, embeddings and LM head in the compute dtype (the QLoRA "
                                     "paper); peft-upcast: every non-quantized weight fp32 "
                                     "(prepare_model_for_kbit_training). --qlora-regime on the command line.")
    master_dtype = dtype if method == "full" and regime == "pure 16-bit" and dtype != "fp32" else "fp32"
    c1, c2 = st.columns(2)
    batch = c1.number_input("Micro-batch per GPU", min_value=1, max_value=4096, value=1, key="batch", bind=QP)
    seq_len = c2.number_input("Sequence length (tokens)", min_value=1, max_value=1_048_576, value=512, step=128,
                              key="seq", bind=QP)
    attention = st.selectbox("Attention", ["sdpa", "eager"], key="attn", bind=QP)
    grad_ckpt = st.toggle("Gradient checkpointing", key="gc", bind=QP,
                          help="Recompute activations in the backward pass: less memory, about a third more compute")

    st.subheader("Hardware")
    default_gpu = "a100-80gb" if "a100-80gb" in gpu_ids else (gpu_ids[0] if gpu_ids else None)
    gpu_id = st.selectbox("GPU", gpu_ids, index=gpu_ids.index(default_gpu) if default_gpu else 0, key="gpu",
                          bind=QP)
    st.caption(f"{gpu_by_id[gpu_id].name}: {fmt_bytes(gpu_by_id[gpu_id].memory_bytes)} "
               f"({fmt_bytes(gpu_by_id[gpu_id].usable_bytes)} usable, the nvidia-smi total), "
               f"${gpu_by_id[gpu_id].price_usd_per_hour:.2f} per hour")
    c1, c2 = st.columns(2)
    num_gpus = c1.number_input("GPUs", min_value=1, max_value=65536, value=1, key="n", bind=QP)
    sharding = c2.selectbox("Sharding", ["none", "ddp", "zero1", "zero2", "zero3", "fsdp"], key="shard", bind=QP,
                            help="With more than one GPU, 'none' means plain data parallel (ddp).")
    offload = st.toggle("CPU offload", key="offload", bind=QP,
                        help="Optimizer states in CPU memory; with ZeRO-3/FSDP the parameters too")

    st.subheader("Data, time and cost")
    c1, c2, c3 = st.columns(3)
    examples = c1.number_input("Examples", min_value=1, value=10_000, step=1000, key="examples", bind=QP)
    tokens_per_example = c2.number_input("Tokens / example", min_value=1, value=512, step=64, key="tpe", bind=QP)
    epochs = c3.number_input("Epochs", min_value=0.1, max_value=1000.0, value=3.0, step=1.0, key="epochs", bind=QP)
    c1, c2 = st.columns(2)
    mfu = c1.number_input("MFU (0 = the GPU's default)", min_value=0.0, max_value=1.0, value=0.0, step=0.05,
                          key="mfu", bind=QP, help="Model FLOPs utilisation: share of the GPU's peak FLOP/s reached")
    price = c2.number_input("USD per GPU-hour (0 = catalog price)", min_value=0.0, value=0.0, step=0.1,
                            key="price", bind=QP)

# ---- the request ----------------------------------------------------------------------------------------------
fields = dict(model=model_ref, method=method, rank=rank, alpha=alpha or None, targets=targets, dropout=dropout,
              dora=dora, rslora=rslora, dtype=dtype, master_dtype=master_dtype, qlora_regime=qlora_regime,
              optimizer=optimizer, batch_size=batch, seq_len=seq_len,
              grad_checkpointing=grad_ckpt, attention=attention, gpu=gpu_id, num_gpus=num_gpus, sharding=sharding,
              offload=offload, examples=examples, tokens_per_example=tokens_per_example, epochs=epochs,
              mfu=mfu or None, price=price or None)

with results:
    if not model_ref:
        st.info("Choose a model on the left.")
        st.stop()
    req, err = attempt(EstimateRequest, **fields)
    if err:
        st.stop()
    with st.spinner("Building the meta model and tracing one training step..."):
        est, err = attempt(estimates.estimate, req)
    if err:
        st.stop()

    mem = est.memory
    st.subheader(f"{est.model.display_name} · {estimates.METHOD_LABELS[est.method]} · "
                 f"{est.gpu.count} x {est.gpu.name}")
    m1, m2, m5 = st.columns(3)
    m3, m4, m6 = st.columns(3)
    m6.metric("Time", fmt_hours(est.compute.hours) if est.compute else "-", help="wall-clock for the data given")
    m1.metric("Peak per GPU", fmt_bytes(mem.peak_bytes), help=f"What the card holds at the peak ({mem.peak_phase}): "
              "reserved + CUDA context (+ NCCL)")
    m2.metric("Usable GPU memory", fmt_bytes(est.gpu.usable_bytes or est.gpu.memory_bytes),
              help=f"nvidia-smi total; datasheet {fmt_bytes(est.gpu.memory_bytes)}")
    m3.metric("Parameters", fmt_params(est.model.total_params))
    m4.metric("Trainable", fmt_params(est.model.trainable_params))
    m5.metric("Cost", fmt_usd(est.compute.cost_usd) if est.compute else "-",
              help="GPU-hours x price per GPU-hour")
    a1, a2 = st.columns(2)
    a3, a4 = st.columns(2)
    a1.metric("Allocated peak", fmt_bytes(mem.allocated_peak_bytes), help="tensors + cuBLAS workspaces: what "
              "torch.cuda.max_memory_allocated reports")
    a2.metric("Reserved peak", fmt_bytes(mem.reserved_peak_bytes), help="+ the caching allocator's cached and "
              "fragmented blocks: what torch.cuda.max_memory_reserved reports")
    a3.metric("Headroom", fmt_bytes(mem.headroom_bytes), help="kept free above the peak before calling it a fit")
    a4.metric("Margin", ("-" if mem.margin_bytes < 0 else "") + fmt_bytes(abs(mem.margin_bytes)),
              help="usable - headroom - peak; negative: does not fit")
    if est.eval_memory is not None and est.host_memory is not None:
        ev = est.eval_memory
        st.caption(f"Eval phase: {fmt_bytes(ev.device_peak_bytes)} on the card ({ev.phase}, KV cache "
                   f"{fmt_bytes(ev.kv_cache_bytes)}){'' if est.eval_fits else ' - does not fit'}. Host RAM per "
                   f"process: {fmt_bytes(est.host_memory.peak_bytes)}.")
    if mem.load_peak_bytes:
        st.caption(f"Loading: {fmt_bytes(mem.load_device_peak_bytes)} on the card at its peak "
                   f"({LOAD_WHY.get(mem.load_reason, mem.load_reason)})"
                   f"{'' if est.load_fits else ' - does not fit'}.")
    usable = fmt_bytes(est.gpu.usable_bytes)
    if est.fits:
        st.success(f"Fits: peak {fmt_bytes(mem.peak_bytes)} of {usable} usable per GPU, "
                   f"margin {fmt_bytes(mem.margin_bytes)} after {fmt_bytes(mem.headroom_bytes)} headroom "
                   f"(peak during {mem.peak_phase}).", icon=":material/check_circle:")
    elif mem.margin_bytes < 0:  # the training step itself
        hint = ""
        more, _ = attempt(estimates.smallest_gpu_count, req.model_copy(update={"sharding": "zero3"}))
        if more:
            hint = f" With ZeRO-3 it needs {more} x {est.gpu.name}."
        tips = [t for t, useful in (("QLoRA", req.method != "qlora" and req.targets != EXPERTS_PRESET),
                                    ("gradient checkpointing", not req.grad_checkpointing),
                                    ("a smaller micro-batch", req.batch_size > 1), ("more GPUs with sharding", True))
                if useful]
        st.error(f"Does not fit: peak {fmt_bytes(mem.peak_bytes)} + {fmt_bytes(mem.headroom_bytes)} headroom > "
                 f"{usable} usable per GPU (peak during {mem.peak_phase}).{hint} Try {', '.join(tips[:-1])}"
                 f"{' or ' if len(tips) > 1 else ''}{tips[-1]}.", icon=":material/block:")
    else:
        phase, peak = est.failing_phase()
        if phase == "loading" and mem.load_reason == "unsharded":
            fix = ("Every GPU loads the whole 4-bit model before it is sharded; use GPUs that hold it, or LoRA "
                   "with sharding.")
        elif phase == "loading":
            fix = ("Each layer's experts are built in 16 bits before they are quantized; try a card with more "
                   "memory, or LoRA on more GPUs with sharding.")
        else:
            fix = "Lower the eval batch or the generated length."
        when = "while loading" if phase == "loading" else "during evaluation"
        st.error(f"Does not fit {when}: {fmt_bytes(peak)} on the card > {usable} usable (training itself "
                 f"needs {fmt_bytes(mem.peak_bytes)}). {fix}", icon=":material/block:")

    tab_names = ["Memory", "Parameters", "Time and cost", "Which GPUs fit", "Ranks", "Storage", "Download"]
    tabs = st.tabs(tab_names, key="tab", on_change="rerun", bind=QP)
    t_mem, t_par, t_time, t_fit, t_rank, t_store, t_dl = tabs

    def is_open(tab) -> bool:
        return tab.open is not False  # None when state tracking is off (AppTest before a click): render all

    if is_open(t_mem):
        with t_mem:
            columns, failures = {}, {}
            for m in estimates.METHODS:
                try:
                    e = est if m == est.method else estimates.estimate(estimates.for_method(req, m))
                except (UserError, ValidationError) as exc:
                    failures[m] = message_of(exc)
                    continue
                columns[estimates.METHOD_LABELS[m]] = e.memory.model_dump(mode="json")
            st.plotly_chart(figures.figure("memory_bars", columns=columns, gpu_bytes=est.gpu.usable_bytes
                                           or est.gpu.memory_bytes, gpu_label=est.gpu.name), key="mem_chart")
            for m, msg in failures.items():
                st.warning(f"{estimates.METHOD_LABELS[m]}: {msg}")
            rows = [{"part": k.removeprefix("memory.").removesuffix("_bytes").replace("_", " "),
                     "per GPU": fmt_bytes(v), "bytes": v} for k, v in estimate_rows(est)
                    if k.startswith("memory.") and k.count(".") == 1 and isinstance(v, int)]
            st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
            for note in getattr(est, "notes", []) or []:
                st.caption(f"· {note}")

    if is_open(t_par):
        with t_par:
            b = est.model.breakdown
            parts = [(k, getattr(b, k)) for k in ("embeddings", "attention", "mlp", "norms", "head", "other")]
            df = pd.DataFrame([{"part": k, "parameters": v, "share": v / max(b.total, 1)} for k, v in parts])
            st.dataframe(df, hide_index=True, width="stretch",
                         column_config={"share": st.column_config.ProgressColumn("share", min_value=0, max_value=1,
                                                                                format="percent")})
            st.write(f"Total **{b.total:,}** parameters; **{est.model.trainable_params:,}** trainable with "
                     f"{estimates.METHOD_LABELS[est.method]}"
                     + (f"; **{b.active:,}** active per token (MoE)." if b.active and b.active != b.total else "."))
            if est.adapter_bytes:
                st.write(f"Adapter file: **{fmt_bytes(est.adapter_bytes)}**; full checkpoint: "
                         f"**{fmt_bytes(est.checkpoint_bytes)}**.")

    if is_open(t_time):
        with t_time:
            c = est.compute
            if c is None or c.hours is None:
                st.info("Give examples and tokens per example to get time and cost.")
            else:
                k1, k2, k3, k4 = st.columns(4)
                k1.metric("Wall-clock", fmt_hours(c.hours))
                k2.metric("GPU-hours", f"{c.gpu_hours:,.1f}")
                k3.metric("Cost", fmt_usd(c.cost_usd))
                k4.metric("Training FLOPs", fmt_flops(c.flops))
                st.caption(f"{c.tokens:,} tokens at MFU {c.mfu:.0%} of the GPU's peak, "
                           f"${c.price_usd_per_hour:.2f} per GPU-hour.")

    if is_open(t_fit):
        with t_fit:
            with st.spinner("Estimating every catalog GPU for each method..."):
                grid = {}
                for m in estimates.METHODS:
                    fit, err = attempt(estimates.fitting, estimates.for_method(req, m))
                    for gid, e in fit or []:
                        grid.setdefault(gid, {})[estimates.METHOD_LABELS[m]] = (
                            f"{'fits' if e.fits else 'no'} · {fmt_bytes(e.memory.peak_bytes)}")
            df = pd.DataFrame([{"GPU": gpu_by_id[g].name if g in gpu_by_id else g,
                                "memory": fmt_bytes(gpu_by_id[g].memory_bytes) if g in gpu_by_id else "", **cells}
                               for g, cells in grid.items()])
            st.caption(f"{num_gpus} GPU(s) each, sharding '{req.sharding}', the knobs on the left.")
            st.dataframe(df, hide_index=True, width="stretch")
            st.markdown(f"**On {est.gpu.count} x {est.gpu.name} with {estimates.METHOD_LABELS[est.method]}**")
            with st.spinner("Searching the largest batch and sequence that fit..."):
                lim, _ = attempt(estimates.limits, req)
                count, _ = attempt(estimates.smallest_gpu_count, req)
            if lim is not None:
                max_batch, max_seq = lim
                l1, l2, l3 = st.columns(3)
                l1.metric("Largest micro-batch", f"{max_batch:,}" if max_batch else "none fits",
                          help=f"at {seq_len:,} tokens per sequence")
                l2.metric("Longest sequence", f"{max_seq:,} tokens" if max_seq else "none fits",
                          help=f"at micro-batch {batch}")
                l3.metric("Fewest GPUs that fit", f"{count:,}" if count else "none",
                          help="with the sharding on the left (or the best strategy when none is set)")

    if is_open(t_rank):
        with t_rank:
            if not is_adapter:
                st.info("Rank matters for LoRA and QLoRA; pick one of them.")
            else:
                pts = []
                with st.spinner("Estimating each rank..."):
                    for r in RANKS:
                        e, err = attempt(estimates.estimate, req.model_copy(update={"rank": r, "alpha": None}))
                        if e is not None:
                            pts.append((r, e.memory.peak_bytes, e.adapter_bytes or 0, e.model.trainable_params))
                if pts:
                    st.plotly_chart(figures.figure("rank_lines", ranks=[p[0] for p in pts],
                                                   peak_bytes=[p[1] for p in pts], adapter_bytes=[p[2] for p in pts],
                                                   gpu_bytes=est.gpu.memory_bytes), key="rank_chart")
                    st.dataframe(pd.DataFrame([{"rank": r, "peak per GPU": fmt_bytes(pk), "adapter": fmt_bytes(ab),
                                                "trainable": f"{tp:,}"} for r, pk, ab, tp in pts]),
                                 hide_index=True, width="stretch")

    if is_open(t_store):
        with t_store:
            storage_for_tasks = estimates.api("storage_for_tasks")
            n_tasks = st.number_input("Tasks (one fine-tuned variant each)", min_value=1, max_value=10_000,
                                      value=10, key="tasks", bind=QP)
            s, err = attempt(storage_for_tasks, est, int(n_tasks))
            if s:
                st.dataframe(pd.DataFrame([{"what": k.replace("_", " "),
                                            "value": fmt_bytes(v) if "bytes" in k else (f"{v:,.1f}x" if k == "ratio" and v else str(v))}
                                           for k, v in s.items()]), hide_index=True, width="stretch")
                ns = sorted({1, max(1, n_tasks // 4), max(1, n_tasks // 2), n_tasks})
                per = [storage_for_tasks(est, n) for n in ns]
                if per[0].get("base_plus_adapters_bytes") is not None:
                    st.plotly_chart(figures.figure("storage_lines", n_tasks=ns,
                                                   full_bytes=[p["full_checkpoints_bytes"] for p in per],
                                                   adapter_bytes=[p["base_plus_adapters_bytes"] for p in per]),
                                    key="storage_chart")

    if is_open(t_dl):
        with t_dl:
            data = est.to_json()
            c1, c2, c3 = st.columns(3)
            c1.download_button("JSON", json.dumps(data, indent=2), file_name="estimate.json",
                               mime="application/json", icon=":material/download:")
            c2.download_button("CSV", estimate_csv(est), file_name="estimate.csv", mime="text/csv",
                               icon=":material/download:")
            c3.download_button("Markdown", estimate_markdown(est), file_name="estimate.md", mime="text/markdown",
                               icon=":material/download:")
            st.caption("The same estimate from a terminal:")
            st.code(estimate_cli(req), language="bash")
