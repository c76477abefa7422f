"""Advisor: a few questions about your situation, one group at a time, then the method with its reasons,
the figures that back it, the alternatives and why not, and a button that carries it to the Launch page."""

import streamlit as st
from pydantic import ValidationError

from advisor.answers import Answers
from ui import charts, datasets, estimates, state
from ui.errors import show
from ui.format import fmt_bytes, fmt_hours, fmt_params, fmt_usd
from ui.lazy import pandas as pd  # pandas loads at the first table, not when the page starts
from ui.nav import page_file
from ui.recommend import recommend_cached

SESSION = "session"
FORM_WIDTH_PX = 760  # questions read better in a column than stretched across a wide screen
GROUPS = [
    ("Your model and data", ["model", "examples", "tokens_per_example", "epochs"]),
    ("Your task", ["complexity", "domain", "accuracy_pct"]),
    ("Deployment", ["num_tasks", "deployment", "rapid_updates", "continual"]),
    ("Hardware and budget", ["rent_in_cloud", "gpu", "num_gpus", "budget_usd"]),
]
LABELS = {
    "model": "Model", "examples": "Training examples per task", "tokens_per_example": "Typical tokens per example",
    "epochs": "Epochs", "complexity": "Task complexity", "domain": "Domain vs pre-training",
    "accuracy_pct": "Accuracy you need (%)", "num_tasks": "Number of tasks", "deployment": "Deployment",
    "rapid_updates": "Rapid updates needed", "continual": "Continual learning", "rent_in_cloud": "Rent GPUs in the cloud",
    "gpu": "GPU you have", "num_gpus": "How many", "budget_usd": "Budget (USD, all tasks)",
}
CHOICES = {
    "complexity": ["simple", "summarization", "reasoning", "coding"],
    "domain": ["close", "different"],
    "deployment": ["edge", "cloud", "on-prem"],
    "continual": ["none", "sequential", "critical"],
}
# Groups not in GROUPS (a field added to Answers later) are asked on the last step.
_grouped = {f for _, fs in GROUPS for f in fs}
GROUPS[-1][1].extend(f for f in Answers.model_fields if f not in _grouped)

ss = st.session_state
defaults = Answers().model_dump()
answers = ss.setdefault(state.ANSWERS, dict(defaults))
for name, value in defaults.items():
    answers.setdefault(name, value)
    if f"adv_{name}" not in ss:
        ss[f"adv_{name}"] = answers[name]
step = ss.setdefault(state.ADVISOR_STEP, 0)

st.title("Advisor")
st.caption("Full fine-tuning, LoRA or QLoRA? Answer a few questions; the seed article's decision rules pick a "
           "method and the estimator checks that it fits your GPUs and budget.")


def _widget(name: str) -> None:
    field = Answers.model_fields[name]
    key, label, help_ = f"adv_{name}", LABELS.get(name, name), field.description
    if name == "model":
        names = estimates.model_names()
        ids = list(names)
        st.selectbox(label + " (catalog id, or type a config.json path / model folder)", ids, key=key, help=help_,
                     accept_new_options=True, persist_state=SESSION,
                     format_func=lambda i: f"{names[i]} · {i}" if i in names else i)
    elif name == "gpu":
        gpus = estimates.gpus()
        names = {g.id: f"{g.name} ({fmt_bytes(g.memory_bytes)})" for g in gpus}
        st.selectbox(label, [g.id for g in gpus], key=key, help=help_, persist_state=SESSION,
                     format_func=lambda g: names.get(g, g), disabled=bool(ss.get("adv_rent_in_cloud")))
    elif name in CHOICES:
        st.segmented_control(label, CHOICES[name], key=key, help=help_, required=True, persist_state=SESSION)
    elif field.annotation is bool:
        st.toggle(label, key=key, help=help_, persist_state=SESSION)
    elif field.annotation is int:
        st.number_input(label, min_value=0, step=1, key=key, help=help_, persist_state=SESSION)
    elif field.annotation is float:
        st.number_input(label, min_value=0.0, step=1.0 if name != "accuracy_pct" else 0.5, key=key, help=help_,
                        persist_state=SESSION)
    else:
        st.text_input(label, key=key, help=help_, persist_state=SESSION)
    answers[name] = ss[key]


def _go(to: int) -> None:
    ss[state.ADVISOR_STEP] = to


n_steps = len(GROUPS)
if step < n_steps:
    title, names = GROUPS[step]
    st.progress((step + 1) / (n_steps + 1), text=f"Step {step + 1} of {n_steps}: {title}")
    with st.container(border=True, width=FORM_WIDTH_PX):
        st.subheader(title)
        for name in names:
            _widget(name)
    try:
        Answers.model_validate(answers)
        problems = []
    except ValidationError as exc:  # shown next to this step's questions, per field
        problems = [e for e in exc.errors() if (e.get("loc") or ("",))[0] in names or not e.get("loc")]
    for e in problems:
        loc = ".".join(str(p) for p in e.get("loc", ())) or "answers"
        show(f"{LABELS.get(loc, loc)}: {e.get('msg')} (got {e.get('input')!r})")
    nav = st.container(horizontal=True, width=FORM_WIDTH_PX)
    nav.button("Back", disabled=step == 0, on_click=_go, args=(step - 1,), icon=":material/arrow_back:")
    last = step == n_steps - 1
    nav.button("See the recommendation" if last else "Next", type="primary", disabled=bool(problems),
               on_click=_go, args=(step + 1,), icon=":material/arrow_forward:", key="adv_next")
    st.stop()

# ---- the recommendation -------------------------------------------------------------------------------------
st.progress(1.0, text="Recommendation")
top = st.container(horizontal=True)
top.button("Change answers", on_click=_go, args=(0,), icon=":material/edit:")
with st.expander("Your answers"):
    st.dataframe(pd.DataFrame([{"question": LABELS.get(k, k), "answer": str(v)} for k, v in answers.items()]),
                 hide_index=True, width="stretch")

with st.spinner("Walking the decision rules and estimating each candidate..."):
    rec, nofit, err = recommend_cached(answers)
if err:
    show(err)
    st.stop()
if nofit is not None:
    st.error(nofit["message"], icon=":material/block:")
    if nofit.get("needed"):
        st.markdown("**What it would take:**\n" + "\n".join(f"- {n}" for n in nofit["needed"]))
    tried = nofit.get("tried") or []
    if tried:
        st.dataframe(pd.DataFrame([{"rung": t["rung"], "method": t["method"], "peak per GPU": fmt_bytes(t["peak_bytes"]),
                                    "GPU memory": fmt_bytes(t["gpu_memory_bytes"]), "cost": fmt_usd(t["cost_usd"]),
                                    "verdict": t.get("verdict") or t.get("error") or ""} for t in tried]),
                     hide_index=True, width="stretch")
    st.stop()

method_label = estimates.METHOD_LABELS[rec.method]
headline = method_label + (f" (r = {rec.rank})" if rec.rank else "")
st.header(f":green[{headline}]")
est = rec.estimate
mem = est.get("memory", {})
comp = est.get("compute", {}) or {}
m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("Peak per GPU", fmt_bytes(mem.get("peak_bytes")),
          help=f"of {fmt_bytes(est.get('gpu', {}).get('memory_bytes'))} on {rec.num_gpus} x {rec.gpu}")
m2.metric("GPUs", f"{rec.num_gpus} x {rec.gpu}")
m3.metric("Trainable parameters", fmt_params(est.get("model", {}).get("trainable_params")))
m4.metric("Time per task", fmt_hours(comp.get("hours")))
m5.metric("Cost (all tasks)", fmt_usd(rec.cost_usd))

for w in rec.warnings:
    st.warning(w, icon=":material/warning:")

st.subheader("Why: the decision path")
st.caption("The seed's decision tree: each question, your answer, the branch taken (green) and the others.")
result = f"{headline}\n{rec.num_gpus} x {rec.gpu}, peak {fmt_bytes(mem.get('peak_bytes'))}"
st.graphviz_chart(charts.decision_dot([n.model_dump() for n in rec.decision_path], result), width="stretch")
left, right = st.columns([1, 1.4], gap="large")
with left:
    st.subheader("Settings")
    settings = {"method": rec.method, "rank r": rec.rank, "alpha": rec.alpha, "dropout": rec.dropout,
                "target modules": rec.target_modules, "rsLoRA": rec.rslora, "DoRA": rec.dora,
                "quantization": rec.quantization, "optimizer": rec.optimizer, "learning rate": rec.learning_rate,
                "epochs": rec.epochs, "micro-batch": rec.micro_batch_size,
                "gradient accumulation": rec.gradient_accumulation_steps,
                "gradient checkpointing": rec.gradient_checkpointing, "sequence length": rec.seq_len,
                "precision": rec.dtype, "sharding": rec.sharding}
    st.dataframe(pd.DataFrame([{"setting": k, "value": str(v)} for k, v in settings.items() if v is not None]),
                 hide_index=True, width="stretch", height="content")
with right:
    st.subheader("Alternatives and why not")
    st.caption("Each method at its own first fitting rung of the ladder, or at the recommendation's knobs "
               "(checkpointing, micro-batch x accumulation, sharding) where that compares fairly; the knobs are named.")
    for a in rec.alternatives:
        name = estimates.METHOD_LABELS.get(a.method, a.method) + (f" (r = {a.rank})" if a.rank else "")
        fit = ":green-badge[fits]" if a.fits else ":red-badge[does not fit]"
        with st.container(border=True):
            at = "its own first fitting rung" if a.at == "own_rung" else "the recommendation's knobs"
            st.markdown(f"**{name}** {fit} · peak {fmt_bytes(a.peak_bytes)} per GPU"
                        f"{f' of {fmt_bytes(a.gpu_memory_bytes)}' if a.gpu_memory_bytes else ''} · "
                        f"cost {fmt_usd(a.cost_usd)} · at {at}: {a.knobs}")
            st.caption(a.why_not)

with st.expander("Every rule that fired (with the seed's words)"):
    st.dataframe(pd.DataFrame([{"kind": r.kind, "question": r.question, "answer": r.answer, "effect": r.effect,
                                "rule": r.rule, "seed section": r.section, "seed says": r.quote}
                               for r in rec.reasons]), hide_index=True, width="stretch")
if rec.storage:
    with st.expander("Storage for your tasks"):
        st.dataframe(pd.DataFrame([{"what": k, "value": fmt_bytes(v) if "bytes" in k and isinstance(v, int) else str(v)}
                                   for k, v in rec.storage.items()]), hide_index=True, width="stretch")

st.divider()
shipped = datasets.shipped()
if st.button("Launch this run", type="primary", icon=":material/rocket_launch:", key="adv_launch"):
    spec = rec.to_run_spec(str(shipped[0]) if shipped else "")
    ss[state.LAUNCH_SPEC] = spec.model_dump(mode="json")
    ss[state.LAUNCH_SOURCE] = "advisor's recommendation"
    ss[state.LAUNCH_GPU] = rec.gpu
    st.switch_page(page_file("launch"))
st.caption("Carries these settings to the Launch page, where you pick the dataset and check it before starting.")
