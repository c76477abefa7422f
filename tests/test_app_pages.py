"""One AppTest per page: it renders without an exception, and its main interaction changes what it should.

Pages run against the real packages (estimator, advisor, runner) on tiny models; nothing is mocked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from runner.spec import DatasetSpec, RunSpec
from ui import state

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120  # a page that loads a tiny model or traces a step; normally a few seconds


def _page(name: str) -> AppTest:
    return AppTest.from_file(str(ROOT / "ui" / "app_pages" / f"{name}.py"), default_timeout=TIMEOUT_S)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """40 prompt/completion rows of small sums (the tiny tokenizer was trained on this kind of text)."""
    rows = [{"prompt": f"What is {a} plus {b}? ", "completion": f"{a + b}"} for a in range(8) for b in range(5)]
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_spec(model_dir, dataset, **kw) -> RunSpec:
    base = dict(name="app-test", model=str(model_dir), method="lora", max_steps=3, save_steps=2, device="cpu",
                precision="fp32", seq_len=64, dataset=DatasetSpec(path=str(dataset)))
    base.update(kw)
    return RunSpec(**base)


# ---- router ----------------------------------------------------------------------------------------------
def test_router_renders_the_advisor_first(monkeypatch):
    monkeypatch.setenv("FTADVISOR_WARMUP", "0")  # no background import thread inside the test process
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT_S).run()
    assert not at.exception
    assert at.title[0].value == "Advisor"
    assert any("Data folder" in c.value for c in at.sidebar.caption)


@pytest.mark.parametrize("name,title", [("advise", "Advisor"), ("estimate", "Estimate"), ("launch", "Launch"),
                                        ("runs", "Runs"), ("adapters", "Adapters")])
def test_every_page_renders_its_title_without_an_exception(name, title):
    # AppTest reports a page that does not even compile as an empty page, so the title is checked too
    at = _page(name).run()
    assert not at.exception, at.exception
    assert at.title[0].value == title


# ---- advisor ---------------------------------------------------------------------------------------------
def test_advisor_walks_the_groups_and_keeps_answers():
    at = _page("advise").run()
    assert not at.exception
    assert at.get("progress")[0].value == 20  # step 1 of 4 (+ the recommendation) = 1/5
    at.number_input(key="adv_examples").set_value(777).run()
    at.button(key="adv_next").click().run()
    assert not at.exception
    assert "Step 2 of 4" in at.get("progress")[0].proto.text
    # the first group's answer is kept in the permanent answers dict while its widget is not shown
    assert at.session_state[state.ANSWERS]["examples"] == 777
    at.button[0].click().run()  # Back
    assert at.number_input(key="adv_examples").value == 777


def test_advisor_impossible_answer_shows_an_error_and_blocks_next():
    at = _page("advise")
    at.session_state[state.ADVISOR_STEP] = 3  # hardware and budget
    at.run()
    at.number_input(key="adv_num_gpus").set_value(0).run()
    assert any("greater than or equal to 1" in e for e in _errors(at))
    assert at.button(key="adv_next").disabled


# ---- launch ----------------------------------------------------------------------------------------------
def test_launch_checks_the_dataset_and_launching_creates_a_run(tiny_model_dir, tiny_dataset):
    from ui.jobs import manager

    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = tiny_spec(tiny_model_dir, tiny_dataset).model_dump(mode="json")
    at.session_state[state.LAUNCH_SOURCE] = "test"
    at.run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Rows"] == "40" and any("prompt_completion" in m.value for m in at.markdown)
    before = {r.id for r in manager().list()}
    at.button(key="ln_launch").click().run()
    assert not at.exception
    new = [r for r in manager().list() if r.id not in before]
    assert len(new) == 1 and new[0].spec.max_steps == 3 and new[0].method == "lora"
    assert at.session_state[state.LAUNCHED_RUN] == new[0].id

    # the Runs page cancels it (the Runs page test trains its own run; do not leave this one running)
    runs = _page("runs")
    runs.session_state[state.SELECTED_RUN] = new[0].id
    runs.run()
    assert not runs.exception
    runs.button(key=f"cancel_{new[0].id}").click().run()
    assert manager().wait(new[0].id, timeout_s=60).status in ("cancelled", "completed")


def test_launch_uploaded_dataset_is_stored_safely_and_checked(tiny_model_dir, tiny_dataset):
    from ftcore.paths import uploads_dir

    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = tiny_spec(tiny_model_dir, "").model_dump(mode="json")
    at.run()
    at.button_group(key="ln_ds_src").set_value("Upload").run()
    at.file_uploader(key="ln_ds_upload").set_value(("../../evil name.jsonl", tiny_dataset.read_bytes(),
                                                    "application/jsonl")).run()
    assert not at.exception and not _errors(at)
    stored = at.session_state["ln_ds_uploaded"]
    assert stored.startswith(str(uploads_dir() / "datasets")) and stored.endswith("-evil_name.jsonl")
    assert {m.label: m.value for m in at.metric}["Rows"] == "40"


def test_launch_trust_remote_code_is_an_explicit_warned_opt_in(tiny_model_dir, tiny_dataset):
    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = tiny_spec(tiny_model_dir, tiny_dataset).model_dump(mode="json")
    at.run()
    assert at.checkbox(key="ln_trust").value is False
    assert not [w for w in at.warning if "runs Python code" in w.value]
    at.checkbox(key="ln_trust").check().run()
    assert any("runs Python code shipped with the model" in w.value for w in at.warning)


def test_launch_strategy_picker_shows_memory_per_gpu(tiny_model_dir, tiny_dataset):
    from runner.spec import DistributionSpec

    # a catalog model (its tokenizer is not on disk: the dataset check says so, the estimate still runs)
    spec = tiny_spec(tiny_model_dir, tiny_dataset, model="qwen2.5-0.5b", method="full",
                     distribution=DistributionSpec(nproc_per_node=2))
    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = spec.model_dump(mode="json")
    at.run()
    assert not at.exception
    radio = at.radio(key="ln_strategy")
    assert [o.split(":")[0] for o in radio.options] == ["ddp", "fsdp", "zero2", "zero3"]
    assert all(" per GPU " in o for o in radio.options)
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    per_gpu = {}
    for o in radio.options:
        value, unit = o.split(": ", 1)[1].split(" per GPU")[0].split()
        per_gpu[o.split(":")[0]] = float(value) * units[unit]
    # ZeRO-3 shards weights, gradients and optimizer states; DDP keeps a full copy on each GPU
    assert per_gpu["zero3"] < per_gpu["ddp"]
    radio.set_value("zero3").run()
    assert RunSpec.model_validate(json.loads(at.code[-1].value)).distribution.strategy == "zero3"


def test_launch_refuses_a_spec_that_will_not_fit_unless_told(tiny_model_dir, tiny_dataset):
    # 4096 sequences x 512 tokens in fp32: the logits alone are b x s x vocab 512 x 4 B = 4 GiB, and with the
    # loss's copies and the activations the estimator's peak is ~28 GiB, more than an RTX 3090's 24 GiB
    spec = tiny_spec(tiny_model_dir, tiny_dataset, micro_batch_size=4096, seq_len=512)
    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = spec.model_dump(mode="json")
    at.session_state[state.LAUNCH_GPU] = "rtx-3090"
    at.run()
    assert not at.exception
    assert any("Will not fit" in e for e in _errors(at))
    assert at.button(key="ln_launch").disabled
    at.checkbox(key="ln_anyway").check().run()
    assert not at.button(key="ln_launch").disabled


def test_launch_bad_dataset_shows_row_numbers_and_blocks_launch(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', encoding="utf-8")
    at = _page("launch")
    at.session_state[state.LAUNCH_SPEC] = tiny_spec(tiny_model_dir, bad).model_dump(mode="json")
    at.run()
    assert not at.exception
    assert any("problem" in e for e in _errors(at))
    table = at.dataframe[0].value
    assert 2 in list(table["row"])  # the second line lacks its completion
    assert at.button(key="ln_launch").disabled


# ---- runs and adapters (one real tiny run shared by both) -------------------------------------------------
@pytest.fixture(scope="module")
def completed_run(tiny_model_dir, tiny_dataset):
    from ui.jobs import manager

    rec = manager().launch(tiny_spec(tiny_model_dir, tiny_dataset, name="finished-run"))
    rec = manager().wait(rec.id, timeout_s=240)
    assert rec.status == "completed", manager().log_tail(rec.id)
    return rec


def test_runs_page_shows_a_finished_run(completed_run):
    at = _page("runs")
    at.session_state[state.SELECTED_RUN] = completed_run.id
    at.run()
    assert not at.exception
    assert at.get("progress")[0].value == 100
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Loss"] != "-" and metrics["Eval loss after"] != "-"
    assert at.button(key=f"resume_{completed_run.id}").disabled  # nothing to resume
    assert at.button(key=f"cancel_{completed_run.id}").disabled


def test_adapters_page_generates_with_base_and_adapter(completed_run):
    at = _page("adapters").run()
    assert not at.exception
    assert at.multiselect(key="ad_runs").value == [completed_run.id] or completed_run.id in at.multiselect(key="ad_runs").value
    at.button(key="ad_generate").click().run()
    assert not at.exception and not _errors(at)
    assert len(at.text) >= 2  # the base model's answer and the adapter's answer


# ---- estimate --------------------------------------------------------------------------------------------
def _estimate_page(**query) -> AppTest:
    at = _page("estimate")
    for k, v in query.items():
        at.query_params[k] = v
    return at.run()


def _peak_bytes(at: AppTest) -> int:
    table = at.dataframe[0].value
    return int(table.loc[table["part"] == "peak", "bytes"].iloc[0])


def test_estimate_a_larger_model_raises_the_peak():
    small = _estimate_page(model="qwen2.5-0.5b", method="lora")
    assert not small.exception and not _errors(small)
    large = _estimate_page(model="qwen2.5-7b", method="lora")
    assert not large.exception and not _errors(large)
    assert _peak_bytes(large) > _peak_bytes(small)
    # the headline and the table come from the same Estimate: the table's peak is what the metric shows
    from ui.format import fmt_bytes

    assert {m.label: m.value for m in large.metric}["Peak per GPU"] == fmt_bytes(_peak_bytes(large))


def test_estimate_page_shows_allocated_reserved_headroom_and_the_regime_knob():
    """Issue 10: the page shows allocated, reserved, headroom and margin; the full fine-tuning regime is a knob
    (pure 16-bit halves weights and gradients, so the peak drops)."""
    mixed = _estimate_page(model="qwen2.5-0.5b", method="full")
    pure = _estimate_page(model="qwen2.5-0.5b", method="full", regime="pure 16-bit")
    for at in (mixed, pure):
        assert not at.exception and not _errors(at)
        assert {"Allocated peak", "Reserved peak", "Headroom", "Margin"} <= {m.label for m in at.metric}
    assert pure.selectbox(key="regime").value == "pure 16-bit"
    assert _peak_bytes(pure) < _peak_bytes(mixed)


def test_estimate_says_which_phase_does_not_fit():
    """Phi-3.5-MoE QLoRA on an RTX 4090: the step fits (23.4 GiB on the card) but loading does not (26.1 GiB: the
    last layer's fused experts built in bf16 beside the 4-bit model). Before, the page reported the step's peak
    as if it exceeded the card and suggested QLoRA to a QLoRA run."""
    at = _estimate_page(model="phi-3.5-moe", method="qlora", gpu="rtx-4090", gc="true")
    assert not at.exception
    [error] = _errors(at)
    assert "while loading" in error and "Try QLoRA" not in error
    assert any("Loading:" in c.value for c in at.caption)


def test_estimate_routed_experts_preset_is_reachable_from_the_page():
    """all-linear+experts needs dropout 0 (peft's ParamWrapper); the page had no dropout knob, so a user who picked
    the preset saw an error with no way to follow its fix. With the knob at 0 it estimates."""
    stuck = _estimate_page(model="qwen3-30b-a3b", method="lora", targets="all-linear+experts")
    assert any("set dropout to 0" in e for e in _errors(stuck))
    ok = _estimate_page(model="qwen3-30b-a3b", method="lora", targets="all-linear+experts", dropout="0.0")
    assert not ok.exception and ok.number_input(key="dropout").value == 0.0
    assert "Peak per GPU" in {m.label for m in ok.metric}  # an estimate (136.7 GiB: it does not fit one A100)
    assert not any("dropout" in e or "QLoRA" in e for e in _errors(ok))  # QLoRA cannot adapt the experts


def test_estimate_link_sets_the_knobs_and_every_tab_renders():
    for tab in ["Parameters", "Time and cost", "Which GPUs fit", "Ranks", "Storage", "Download"]:
        at = _estimate_page(model="qwen2.5-0.5b", method="qlora", gpu="rtx-4090", batch="2", tab=tab)
        assert not at.exception, (tab, at.exception)
        assert at.selectbox(key="model").value == "qwen2.5-0.5b"
        assert at.selectbox(key="gpu").value == "rtx-4090"
        assert at.number_input(key="batch").value == 2
        if tab == "Which GPUs fit":
            labels = {m.label for m in at.metric}
            assert {"Largest micro-batch", "Longest sequence", "Fewest GPUs that fit"} <= labels
            assert len(at.dataframe[0].value) >= 13  # every catalog GPU has a row
    assert len(at.get("download_button")) == 3  # JSON, CSV, Markdown on the last tab


def test_estimate_bad_model_path_is_a_readable_error(tmp_path):
    at = _estimate_page(src="Folder", path=str(tmp_path / "no-such-model"))
    assert not at.exception
    assert _errors(at) and "no-such-model" in _errors(at)[0]


def test_estimate_uploaded_config_json_is_estimated(tiny_model_dir):
    at = _estimate_page(src="Upload")
    at.file_uploader(key="config_upload").set_value(("config.json", (tiny_model_dir / "config.json").read_bytes(),
                                                     "application/json")).run()
    assert not at.exception and not _errors(at)
    # independent figure: the parameters actually stored in the tiny model's safetensors file
    from safetensors import safe_open

    from ui.format import fmt_params

    with safe_open(str(tiny_model_dir / "model.safetensors"), "np") as f:
        stored = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                     else int(__import__("math").prod(f.get_slice(k).get_shape())) for k in f.keys())
    assert {m.label: m.value for m in at.metric}["Parameters"] == fmt_params(stored)


def test_estimate_hub_id_offline_says_so():
    at = _estimate_page(src="Hub", hub="someone/unknown-model-7b")  # not a catalog model's hub id
    assert not at.exception
    assert _errors(at) and "offline" in _errors(at)[0].lower()


def test_estimate_impossible_knob_is_a_readable_error():
    at = _estimate_page(model="qwen2.5-0.5b", seq="1048576", batch="4096")
    assert not at.exception  # an absurd request is refused with a message, never a traceback
    assert _errors(at) or {m.label: m.value for m in at.metric}


def test_advisor_impossible_situation_shows_what_it_would_take():
    at = _page("advise")
    at.session_state[state.ANSWERS] = {"model": "llama-3.1-405b", "gpu": "t4", "num_gpus": 1, "budget_usd": 1.0,
                                       "accuracy_pct": 99.0}
    at.session_state[state.ADVISOR_STEP] = 4
    at.run()
    assert not at.exception, at.exception
    assert _errors(at)  # nothing fits one T4 for $1: said plainly, with the closest option tried
    assert not [b for b in at.button if b.key == "adv_launch"]


# ---- advisor -> launch -----------------------------------------------------------------------------------
def test_advisor_recommendation_carries_the_run_to_the_launch_page(monkeypatch):
    monkeypatch.setenv("FTADVISOR_WARMUP", "0")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=TIMEOUT_S)
    at.session_state[state.ANSWERS] = {"model": "qwen2.5-0.5b", "gpu": "rtx-4090", "examples": 2000}
    at.session_state[state.ADVISOR_STEP] = 4
    at.run()
    assert not at.exception, at.exception
    assert not _errors(at)
    at.button(key="adv_launch").click().run()
    assert not at.exception
    spec = RunSpec.model_validate(at.session_state[state.LAUNCH_SPEC])
    assert spec.model == "qwen2.5-0.5b" and spec.method in ("full", "lora", "qlora")
    assert at.title[0].value == "Launch"
    assert at.text_input(key="ln_model").value == "qwen2.5-0.5b"


@pytest.mark.slow
def test_runs_page_stop_and_save_then_resume(tiny_model_dir, tiny_dataset):
    """Stop-and-save from the Runs page ends the run 'stopped'; Resume continues it to completion."""
    import time

    from ui.jobs import manager

    # long enough that it cannot finish while the page renders (400 steps of the tiny model once did, on a quiet
    # machine: the buttons were disabled because the run had completed); stopped and cancelled below anyway
    rec = manager().launch(tiny_spec(tiny_model_dir, tiny_dataset, name="stoppable", max_steps=20_000, save_steps=5))
    deadline = time.monotonic() + 180
    while (manager().get(rec.id).step or 0) < 2 and time.monotonic() < deadline:
        time.sleep(1)  # the heartbeat reports steps every few seconds
    at = _page("runs")
    at.session_state[state.SELECTED_RUN] = rec.id
    at.run()
    assert not at.button(key=f"stop_{rec.id}").disabled
    at.button(key=f"stop_{rec.id}").click().run()
    stopped = manager().wait(rec.id, timeout_s=120)
    assert stopped.status == "stopped", stopped
    at.run()
    assert not at.button(key=f"resume_{rec.id}").disabled
    at.button(key=f"resume_{rec.id}").click().run()
    assert manager().get(rec.id).status in ("queued", "running")
    manager().cancel(rec.id)


# ---- cached figures (ui/figures.py) ------------------------------------------------------------------------
def test_a_cached_figure_is_drawn_as_a_freshly_built_one():
    # ui.figures shares one figure object between reruns; st.plotly_chart must draw it unchanged each time
    # (it serialises a copy). The reference is plotly's own JSON of a figure built anew by ui.charts.
    import plotly.io

    from ui import charts

    args = dict(n_tasks=[1, 10], full_bytes=[2**30, 10 * 2**30], adapter_bytes=[2**30, 2**30 + 10 * 2**20])

    def page():
        import streamlit as st

        from ui import figures

        args = dict(n_tasks=[1, 10], full_bytes=[2**30, 10 * 2**30], adapter_bytes=[2**30, 2**30 + 10 * 2**20])
        first = figures.figure("storage_lines", **args)
        st.plotly_chart(first, key="first")
        again = figures.figure("storage_lines", **args)
        st.plotly_chart(again, key="again")
        st.text(str(first is again))

    at = AppTest.from_function(page, default_timeout=TIMEOUT_S).run()
    assert not at.exception, at.exception
    specs = [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]
    assert len(specs) == 2 and specs[0] == specs[1]
    assert specs[0] == json.loads(plotly.io.to_json(charts.storage_lines(**args), validate=False))
    assert at.text[0].value == "True"  # built once, then the same object
