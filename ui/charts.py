"""Plotly figures the pages draw. Inputs are plain numbers (bytes, steps); no Streamlit, no package logic."""

from __future__ import annotations

import functools
import sys

import plotly.graph_objects as go

from ui.format import GIB, fmt_bytes

# Memory parts in the order they are stacked (bottom to top), with a colour per part.
MEMORY_PARTS = (
    ("weights_bytes", "Weights", "#4C78A8"),
    ("gradients_bytes", "Gradients", "#F58518"),
    ("optimizer_bytes", "Optimizer states", "#E45756"),
    ("activations_bytes", "Activations", "#72B7B2"),
    ("optimizer_temp_bytes", "Optimizer-step temporaries", "#FF9DA6"),
    ("gathered_bytes", "Gathered layers (ZeRO-3/FSDP)", "#9D755D"),
    ("overhead_bytes", "CUDA context + allocator", "#BAB0AC"),
)
CLIP_OVER_GPU = 2.5  # y-axis stops at 2.5 x the GPU's memory when a bar is far taller (readability only)
CLIP_TRIGGER = 1.6  # ... and only when the tallest peak exceeds 1.6 x that cap
_LAYOUT = dict(margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.18), height=380)


def _settled_pandas(fn):
    """plotly reads pandas straight from ``sys.modules``; while the warm-up thread (ui/warmup.py) is still importing
    it, that is a half-built module and plotly fails ("partially initialized module 'pandas' has no attribute
    'Series'", seen in a real browser). An import statement waits for the other thread's import to finish."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "pandas" in sys.modules:
            import pandas  # noqa: F401
        return fn(*args, **kwargs)

    return wrapper


@_settled_pandas
def memory_bars(columns: dict[str, dict], gpu_bytes: int | None, gpu_label: str = "GPU") -> go.Figure:
    """Stacked bars of memory parts per column (e.g. per method), a diamond at the peak, the GPU's memory line.

    ``columns`` maps a label to a dict with the MEMORY_PARTS keys, ``peak_bytes`` and ``peak_phase`` (bytes).
    """
    fig = go.Figure()
    labels = list(columns)
    for key, name, colour in MEMORY_PARTS:
        ys = [columns[c].get(key, 0) / GIB for c in labels]
        fig.add_bar(name=name, x=labels, y=ys, marker_color=colour,
                    hovertemplate="%{x}<br>" + name + ": %{y:.2f} GiB<extra></extra>")
    peaks = [columns[c]["peak_bytes"] / GIB for c in labels]
    phases = [str(columns[c].get("peak_phase", "")) for c in labels]
    fig.add_scatter(name="Peak of the step", x=labels, y=peaks, mode="markers+text",
                    marker=dict(symbol="diamond", size=13, color="black"),
                    text=[f"peak {p:.1f} GiB" for p in peaks], textposition="top center",
                    customdata=phases, hovertemplate="%{x}<br>peak %{y:.2f} GiB (%{customdata})<extra></extra>")
    if gpu_bytes:
        fig.add_hline(y=gpu_bytes / GIB, line_dash="dash", line_color="#B22222")
        fig.add_scatter(name=f"{gpu_label}: {fmt_bytes(gpu_bytes)}", x=[labels[0]], y=[None], mode="lines",
                        line=dict(dash="dash", color="#B22222"))  # the line's legend entry
        # One method can dwarf the others (full fine-tuning of 70B: >1 TiB next to QLoRA's 60 GiB). Then the axis
        # stops at CLIP_OVER_GPU x the GPU's memory and each cut bar carries its peak as text at the top.
        top = CLIP_OVER_GPU * gpu_bytes / GIB
        if max(peaks) > top * CLIP_TRIGGER:
            top = max(top, sorted(peaks)[0] * 1.3)
            fig.update_yaxes(range=[0, top])
            for label, peak in zip(labels, peaks):
                if peak > top:
                    fig.add_annotation(x=label, y=top, text=f"↑ peak {peak:,.0f} GiB", showarrow=False,
                                       yanchor="top", font=dict(color="white", size=12), bgcolor="#333")
    fig.update_layout(barmode="stack", yaxis_title="GiB per GPU", **_LAYOUT)
    return fig


@_settled_pandas
def rank_lines(ranks: list[int], peak_bytes: list[int], adapter_bytes: list[int], gpu_bytes: int | None) -> go.Figure:
    """Peak memory (left axis) and adapter file size (right axis) across LoRA ranks."""
    fig = go.Figure()
    fig.add_scatter(name="Peak memory per GPU (GiB)", x=ranks, y=[b / GIB for b in peak_bytes], mode="lines+markers")
    fig.add_scatter(name="Adapter file (MiB)", x=ranks, y=[b / 1024**2 for b in adapter_bytes],
                    mode="lines+markers", yaxis="y2")
    if gpu_bytes:
        fig.add_hline(y=gpu_bytes / GIB, line_dash="dash", line_color="#B22222", annotation_text="GPU memory")
    fig.update_layout(xaxis=dict(title="rank r", type="log", tickvals=ranks, ticktext=[str(r) for r in ranks]),
                      yaxis=dict(title="GiB"), yaxis2=dict(title="MiB", overlaying="y", side="right"), **_LAYOUT)
    return fig


@_settled_pandas
def loss_curves(series: dict[str, tuple[list[float], list[float]]], title: str = "Training loss",
                eval_series: dict[str, tuple[list[float], list[float]]] | None = None) -> go.Figure:
    """One line per run: ``series[name] = (steps, losses)``; eval losses as markers."""
    fig = go.Figure()
    for name, (steps, losses) in series.items():
        fig.add_scatter(name=f"{name} train", x=steps, y=losses, mode="lines")
    for name, (steps, losses) in (eval_series or {}).items():
        fig.add_scatter(name=f"{name} eval", x=steps, y=losses, mode="markers+lines", line=dict(dash="dot"))
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="loss", **_LAYOUT)
    return fig


@_settled_pandas
def intruder_bars(runs: dict[str, dict[int, int]], top_k: int, epsilon: float,
                  min_cos: dict[str, dict[int, float]] | None = None) -> go.Figure:
    """Intruder dimensions per layer, one bar series per run: ``runs[name] = {layer: intruders summed over the
    layer's analysed modules}`` (report.json ``intruder_dimensions``; Shuttleworth et al. 2024). ``min_cos[name] =
    {layer: lowest max |cos| of the layer's top singular vectors}`` adds one line per run on a right axis (1 = the
    tuned top directions are the base's own; below epsilon = an intruder), with epsilon drawn."""
    fig = go.Figure()
    for name, per_layer in runs.items():
        layers = sorted(per_layer)
        fig.add_bar(name=f"{name}: intruders", x=layers, y=[per_layer[l] for l in layers],
                    hovertemplate="layer %{x}: %{y} intruder dimensions<extra>" + name + "</extra>")
    for name, per_layer in (min_cos or {}).items():
        layers = sorted(per_layer)
        fig.add_scatter(name=f"{name}: lowest max |cos|", x=layers, y=[per_layer[l] for l in layers],
                        mode="lines+markers", yaxis="y2",
                        hovertemplate="layer %{x}: lowest max |cos| %{y:.3f}<extra>" + name + "</extra>")
    layout = dict(title=f"Intruder dimensions per layer (top {top_k} singular vectors, max |cos| < {epsilon:g})",
                  xaxis_title="layer", yaxis=dict(title="intruder dimensions", rangemode="tozero"), barmode="group")
    if min_cos:
        layout["yaxis2"] = dict(title="lowest max |cos| to the base", overlaying="y", side="right", range=[0, 1.02])
        fig.add_hline(y=epsilon, line_dash="dot", line_color="#B22222", yref="y2",
                      annotation_text=f"epsilon {epsilon:g}")
    fig.update_layout(**layout, **{**_LAYOUT, "height": 360})
    return fig


@_settled_pandas
def token_histogram(lengths: list[int], seq_len: int) -> go.Figure:
    """Histogram of tokens per row with the sequence-length cut-off drawn."""
    fig = go.Figure(go.Histogram(x=lengths, nbinsx=40, marker_color="#4C78A8", name="rows"))
    fig.add_vline(x=seq_len, line_dash="dash", line_color="#B22222", annotation_text=f"seq_len {seq_len}")
    fig.update_layout(xaxis_title="tokens per row", yaxis_title="rows", bargap=0.05, **{**_LAYOUT, "height": 300})
    return fig


@_settled_pandas
def storage_lines(n_tasks: list[int], full_bytes: list[int], adapter_bytes: list[int]) -> go.Figure:
    """Storage for N tasks: N full copies vs one base + N adapters."""
    fig = go.Figure()
    fig.add_scatter(name="N full fine-tuned copies", x=n_tasks, y=[b / GIB for b in full_bytes], mode="lines+markers")
    fig.add_scatter(name="one base + N adapters", x=n_tasks, y=[b / GIB for b in adapter_bytes], mode="lines+markers")
    fig.update_layout(xaxis_title="tasks", yaxis_title="GiB on disk", **{**_LAYOUT, "height": 320})
    return fig


def _dot_escape(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _wrap(text: str, width: int = 34) -> str:
    words, lines, line = str(text).split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines)


def decision_dot(nodes: list[dict], result_label: str) -> str:
    """Graphviz DOT of the decision path: each question, its options (the taken one highlighted), the result.

    ``nodes`` are TreeNode dicts (id, question, answer, options[{label, leans, chosen}], chosen). The taken path
    runs question -> chosen option -> next question -> ... -> result; options not taken hang off greyed out.
    """
    out = ['digraph G {', 'rankdir=TB; nodesep=0.15; ranksep=0.25; bgcolor="transparent";',
           'node [fontname="Helvetica", fontsize=10, shape=box, style="rounded,filled", fillcolor="#F4F6FA", '
           'color="#9AA5B1"]; edge [color="#C0C7D0"];']
    prev = None
    for i, node in enumerate(nodes):
        qid = f"q{i}"
        label = _wrap(node.get("question", "")) + "\n" + _wrap(node.get("answer", ""), 44)
        out.append(f'{qid} [label="{_dot_escape(label)}", fillcolor="#E3ECF7", color="#4C78A8", penwidth=1.5];')
        if prev:
            out.append(f'{prev} -> {qid} [color="#2E7D32", penwidth=2.5];')
        chosen_id = None
        for j, opt in enumerate(node.get("options") or []):
            oid = f"{qid}o{j}"
            leans = ", ".join(opt.get("leans") or [])
            text = _dot_escape(_wrap(opt.get("label", ""), 26) + (f"\n→ {leans}" if leans else ""))
            if opt.get("chosen"):
                out.append(f'{oid} [label="{text}", fillcolor="#C8E6C9", color="#2E7D32", penwidth=2];')
                out.append(f'{qid} -> {oid} [color="#2E7D32", penwidth=2.5];')
                chosen_id = oid
            else:
                out.append(f'{oid} [label="{text}", fontcolor="#8A949E", fillcolor="#FAFAFA", style="rounded,dashed"];')
                out.append(f'{qid} -> {oid} [style=dashed];')
        prev = chosen_id or qid
    out.append(f'result [label="{_dot_escape(result_label)}", shape=box, fontsize=13, fillcolor="#2E7D32", '
               'fontcolor="white", color="#1B5E20", penwidth=2];')
    if prev:
        out.append(f'{prev} -> result [color="#2E7D32", penwidth=2.5];')
    out.append("}")
    return "\n".join(out)
