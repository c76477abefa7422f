"""Adapters page, new tabs: base vs tuned side by side (labels), GGUF export with a download, intruder dimensions
on demand; a tiny Llama and a hand-made adapter folder typed in, no run needed."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loud_adapter(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("page") / "loud"
    peft_model.save_pretrained(out)
    return out


def _page(tiny_model_dir, adapter) -> AppTest:
    at = AppTest.from_file(str(ROOT / "ui" / "app_pages" / "adapters.py"), default_timeout=180)
    at.run()
    at.text_area(key="ad_extra").set_value(str(adapter)).run()
    at.text_input(key="ad_base").set_value(str(tiny_model_dir)).run()
    assert not at.exception
    return at


def test_compare_export_intruders(tiny_model_dir, loud_adapter):
    at = _page(tiny_model_dir, loud_adapter)
    at.text_area(key="ad_cmp_prompts").set_value("What is 1 plus 2?\nthe model").run()
    at.number_input(key="ad_cmp_new").set_value(4).run()
    at.button(key="ad_compare").click().run()
    assert not at.exception and not at.error
    bold = [m.value for m in at.markdown]
    assert bold.count("**base (no adapter)**") == 2 and bold.count("**adapter: loud**") == 2
    # each prompt shows the base first, then the adapter
    assert bold.index("**base (no adapter)**") < bold.index("**adapter: loud**")

    at.radio(key="ad_exp_fmt").set_value("gguf").run()
    at.button(key="ad_export").click().run()
    assert not at.exception and not at.error
    assert any("gguf export in" in s.value for s in at.success)
    codes = [c.value for c in at.code]
    assert any("ollama create" in c for c in codes) and any("--enable-lora" in c for c in codes)

    at.button(key="ad_intr").click().run()
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Intruder dimensions"]) >= 1  # a random, large update: new directions
    assert metrics["Modules with intruders"].endswith("of 4")
