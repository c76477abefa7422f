"""Runs: every training run with its status; one run live (progress, loss, speed, memory, log); comparisons.

Runs are durable (a folder + a registry row each); this page only reads them and sends cancel / stop / resume.
"""

import pandas as pd
import streamlit as st

from runner.tools.intruder import layer_min_cos, per_layer
from runner.jobs.runfiles import EvalRow, Report, TrainRow, eval_rows, read_report, train_rows
from ui import charts, jobs, state
from ui.errors import attempt
from ui.format import fmt_bytes, fmt_params, fmt_peak, fmt_seconds, last_user_turn

st.title("Runs")
jm = jobs.manager()


def _fmt_time(t) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else ""


def _train_eval(metrics: list[TrainRow | EvalRow]) -> tuple[list[TrainRow], list[EvalRow]]:
    return train_rows(metrics), eval_rows(metrics)


def _report(rec) -> Report | None:
    """The run's report.json; None while it is not written (an off-contract file shows its error here)."""
    report, _ = attempt(read_report, rec.run_dir)
    return report


@st.fragment(run_every=jobs.LIVE_REFRESH_S)
def run_table() -> None:
    records = jm.list()
    if not records:
        st.info("No runs yet. Launch one from the Launch page (or `ftadvisor run --demo`).")
        return
    rows = [{"run": r.id, "name": r.name or "", "status": r.status, "method": r.method,
             "model": r.model, "step": f"{r.step or 0}/{r.max_steps or '?'}", "created": _fmt_time(r.created_at),
             "reason": r.reason or ""} for r in records]
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


@st.fragment(run_every=jobs.LIVE_REFRESH_S)
def live_run(run_id: str) -> None:
    rec, err = attempt(jm.get, run_id)
    if rec is None:
        return
    metrics = jm.metrics(run_id)
    train, evals = _train_eval(metrics)
    last = train[-1] if train else None
    st.subheader(f"{rec.name or rec.id} {jobs.status_badge(rec.status)}")
    st.caption(f"{rec.method} on `{rec.model}` · folder `{rec.output_dir}`")

    max_steps = (last.max_steps if last else None) or rec.max_steps
    step = (last.step if last else None) or rec.step or 0
    if rec.status == "completed":
        st.progress(1.0, text=f"completed: {step} steps")
    elif max_steps:
        st.progress(min(step / max_steps, 1.0), text=f"step {step} of {max_steps}")
    else:
        st.progress(0.0, text=rec.status)

    c1, c2, c3, c4, c5 = st.columns(5)
    c1.metric("Loss", f"{last.loss:.4f}" if last else "-")
    c2.metric("Eval loss", f"{evals[-1].eval_loss:.4f}" if evals else "-")
    c3.metric("Tokens / s", f"{last.tokens_per_s:,.0f}" if last and last.tokens_per_s else "-")
    c4.metric("ETA", fmt_seconds(last.eta_s) if last and rec.status == "running" else "-")
    c5.metric("Memory", fmt_bytes(last.memory_bytes) if last and last.memory_bytes else "-")

    if rec.status == "failed":
        st.error(f"**{rec.kind or 'failed'}**: {rec.reason or 'the worker exited with an error'}"
                 + (f"  \n**Fix:** {rec.fix}" if rec.fix else ""))
    elif rec.status == "stopped":
        st.info("Stopped and saved. Resume continues from the last checkpoint.")

    row = st.container(horizontal=True)
    b1 = b2 = b3 = row
    active = rec.status in ("queued", "running")
    if b1.button("Cancel", key=f"cancel_{run_id}", disabled=not active, icon=":material/cancel:"):
        attempt(jm.cancel, run_id)
        st.rerun(scope="fragment")
    if b2.button("Stop and save", key=f"stop_{run_id}", disabled=rec.status != "running", icon=":material/save:"):
        attempt(jm.stop_and_save, run_id)
        st.rerun(scope="fragment")
    if b3.button("Resume", key=f"resume_{run_id}", disabled=rec.status not in ("stopped", "failed", "cancelled"),
                 icon=":material/play_arrow:"):
        attempt(jm.resume, run_id)
        st.rerun(scope="fragment")

    if train:
        st.plotly_chart(charts.loss_curves({rec.name or rec.id: ([m.step for m in train], [m.loss for m in train])},
                                           eval_series={rec.name or rec.id: ([m.step for m in evals],
                                                                              [m.eval_loss for m in evals])}
                        if evals else None), key=f"loss_{run_id}")
    with st.expander("Log (last lines)", expanded=rec.status == "failed"):
        st.code(jm.log_tail(run_id, n=40) or "(empty)", language="text")
    report = _report(rec)
    if report:
        with st.expander("Final report", expanded=True):
            _show_report(report)


def _show_report(report: Report) -> None:
    k1, k2, k3, k4 = st.columns(4)
    before, after = report.eval_loss_before, report.eval_loss_after
    if after is not None:
        k1.metric("Eval loss after", f"{after:.4f}",
                  delta=f"{after - before:+.4f} vs before" if before is not None else None, delta_color="inverse")
    em_b, em_a = report.exact_match_before, report.exact_match_after
    if em_a is not None:
        k2.metric("Exact match after", f"{em_a:.0%}",
                  delta=f"{em_a - em_b:+.0%} vs before" if em_b is not None and em_a != em_b else None)
    am_b, am_a = report.answer_match_before, report.answer_match_after
    if am_a is not None:
        k2.caption(f"answer match {am_a:.0%}" + (f" (before {am_b:.0%})" if am_b is not None else "")
                   + ": the reference contained in the answer, case-insensitive")
    k3.metric("Trainable parameters", fmt_params(report.trainable_params))
    k4.metric("Adapter file", fmt_bytes(report.adapter_bytes) if report.adapter_bytes else "-")
    st.caption(f"{report.steps} steps in {fmt_seconds(report.train_seconds)} on {report.device} "
               f"({report.precision}); peak memory {fmt_peak(report.peak_memory)}; output `{report.output}`")
    if report.samples:
        table = pd.DataFrame([s.model_dump() for s in report.samples])
        # chat prompts: show the last user turn, not the template's system preamble
        table["prompt"] = table["prompt"].map(lambda p: last_user_turn(p) if p else p)
        st.dataframe(table, hide_index=True, width="stretch")
    _show_after_run(report)
    for note in report.notes:
        st.caption(f"· {note}")


def _show_after_run(report: Report) -> None:
    """Forgetting (general-text loss before/after) and intruder dimensions, as report.json gives them."""
    forget, intr = report.forgetting, report.intruder_dimensions
    if not forget and not intr:
        return
    st.markdown("**After the run: forgetting and intruder dimensions**")
    f1, f2, f3 = st.columns(3)
    if forget and forget.after is not None:
        f1.metric("General-text loss after", f"{forget.after:.4f}",
                  delta=f"{forget.change:+.4f} vs before" if forget.change is not None else None,
                  delta_color="inverse", help=f"mean next-token loss on {forget.texts} general paragraphs "
                                             f"({forget.tokens} tokens, {forget.dataset}); a rise "
                                             "means the model forgot some of its general language modelling")
    if intr:
        s = intr.summary
        f2.metric("Intruder dimensions", f"{s.total}", help=f"{intr.reference}: among the top "
                  f"{intr.top_k} singular vectors of each tuned weight, those with max |cos| < {intr.epsilon} "
                  "to every singular vector of the base weight")
        f3.metric("Modules with intruders", f"{s.modules_with_intruders} of {s.modules}")
        layers = per_layer(intr)
        if layers:
            st.plotly_chart(charts.intruder_bars({report.method: layers}, intr.top_k, intr.epsilon,
                                                 {report.method: layer_min_cos(intr)}), key=f"intr_{report.output}")


def _final_figures(rec) -> dict:
    train, evals = _train_eval(jm.metrics(rec.id))
    report = _report(rec)
    row = {"run": rec.name or rec.id, "status": rec.status, "method": rec.method,
           "rank": rec.spec.peft.r if rec.method != "full" else None,
           "final loss": train[-1].loss if train else None,
           "final eval loss": evals[-1].eval_loss if evals else None,
           "exact match": None, "answer match": None,
           "general-text loss before": None, "general-text loss after": None, "forgetting (change)": None,
           "intruder dimensions": None, "trainable params": "-", "adapter size": "-", "train time": "-"}
    if report is None:  # still running (or failed before the report): the metrics so far
        return row
    forget, intr = report.forgetting, report.intruder_dimensions
    return row | {
        "final loss": report.final_loss if report.final_loss is not None else row["final loss"],
        "final eval loss": report.eval_loss_after if report.eval_loss_after is not None else row["final eval loss"],
        "exact match": report.exact_match_after, "answer match": report.answer_match_after,
        "trainable params": fmt_params(report.trainable_params),
        "adapter size": fmt_bytes(report.adapter_bytes) if report.adapter_bytes else "-",
        "train time": fmt_seconds(report.train_seconds),
        "general-text loss before": forget.before if forget else None,
        "general-text loss after": forget.after if forget else None,
        "forgetting (change)": forget.change if forget else None,
        "intruder dimensions": intr.summary.total if intr else None}


run_table()
records = jm.list()
if not records:
    st.stop()

ids = [r.id for r in records]
labels = {r.id: f"{r.name or r.id} · {r.id}" for r in records}  # no status here: it changes, the label would lag
default = st.session_state.get(state.SELECTED_RUN)
view, compare, sweep = st.tabs(["Run", "Compare", "Rank sweep"])

with view:
    chosen = st.selectbox("Run", ids, index=ids.index(default) if default in ids else 0,
                          format_func=labels.get, key="run_pick")
    st.session_state[state.SELECTED_RUN] = chosen
    live_run(chosen)

with compare:
    picked = st.multiselect("Runs to compare", ids, default=ids[: min(3, len(ids))], format_func=labels.get,
                            key="compare_pick")
    if picked:
        by_id = {r.id: r for r in records}
        series, eval_series = {}, {}
        for rid in picked:
            train, evals = _train_eval(jm.metrics(rid))
            name = by_id[rid].name or rid
            if train:
                series[name] = ([m.step for m in train], [m.loss for m in train])
            if evals:
                eval_series[name] = ([m.step for m in evals], [m.eval_loss for m in evals])
        if series:
            st.plotly_chart(charts.loss_curves(series, "Training loss, overlaid", eval_series), key="cmp_loss")
        st.dataframe(pd.DataFrame([_final_figures(by_id[rid]) for rid in picked]), hide_index=True, width="stretch")
        reports = {by_id[rid].name or rid: _report(by_id[rid]) for rid in picked}
        measured = {name: rep for name, rep in reports.items() if rep and rep.intruder_dimensions}
        intr = {f"{name} ({rep.method})": per_layer(rep.intruder_dimensions) for name, rep in measured.items()}
        if intr:
            first = next(iter(measured.values())).intruder_dimensions
            cos = {f"{name} ({rep.method})": layer_min_cos(rep.intruder_dimensions) for name, rep in measured.items()}
            st.plotly_chart(charts.intruder_bars(intr, first.top_k, first.epsilon, cos), key="cmp_intruders")
            st.caption("Full fine-tuning is counted on the same modules a LoRA run with the spec's targets adapts "
                       "(tuned weight vs base weight). The seed article's claim: LoRA introduces intruder "
                       "dimensions, full fine-tuning does not (Shuttleworth et al. 2024).")

with sweep:
    sweeps: dict[str, list] = {}
    for r in records:
        if getattr(r, "sweep_id", None):
            sweeps.setdefault(r.sweep_id, []).append(r)
    if sweeps:
        sid = st.selectbox("Sweep", list(sweeps), key="sweep_pick")
        members = sorted(sweeps[sid], key=lambda r: r.spec.peft.r)
        st.dataframe(pd.DataFrame([_final_figures(r) for r in members]), hide_index=True, width="stretch")
        series = {}
        for r in members:
            train, _ = _train_eval(jm.metrics(r.id))
            if train:
                series[f"r={r.spec.peft.r}"] = ([m.step for m in train], [m.loss for m in train])
        if series:
            st.plotly_chart(charts.loss_curves(series, "Loss by rank"), key="sweep_loss")
    else:
        st.caption("No rank sweep yet. Start one from a LoRA run's spec:")
    lora_runs = [r for r in records if r.method in ("lora", "qlora")]
    if lora_runs:
        with st.form("sweep_form"):
            base = st.selectbox("Spec to sweep", [r.id for r in lora_runs], format_func=labels.get)
            ranks = st.multiselect("Ranks", [1, 2, 4, 8, 16, 32, 64, 128, 256], default=[4, 8, 16])
            go = st.form_submit_button("Run the sweep (one run after another)")
        if go:
            spec = next(r.spec for r in lora_runs if r.id == base)
            from runner.jobs.sweep import launch_sweep

            made, err = attempt(launch_sweep, jm, spec, sorted(ranks))
            if made:
                st.success(f"Queued {len(made)} runs: " + ", ".join(m.id for m in made))
