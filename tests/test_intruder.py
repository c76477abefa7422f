"""Intruder dimensions: zero when the update lies in W's own top singular directions, positive for a random
direction; the tuned weights rebuilt from the adapter file equal peft's own merge (LoRA, rsLoRA, DoRA)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from runner.tools import intruder


def _aligned_and_random(seed=0, d_out=64, d_in=64, r=4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) / d_in ** 0.5
    u, s, vh = torch.linalg.svd(w)
    # Aligned: stretch W's own top-r singular directions (same vectors, larger singular values).
    aligned = u[:, :r] @ torch.diag(2.0 * s[:r]) @ vh[:r]
    # Random: a rank-1 update along random unit vectors, 3x W's top singular value, so it ranks first.
    a, b = torch.randn(d_out, generator=g), torch.randn(d_in, generator=g)
    rand = 3.0 * s[0] * torch.outer(a / a.norm(), b / b.norm())
    return w, aligned, rand


def test_aligned_update_has_no_intruders():
    w, aligned, _ = _aligned_and_random()
    n, best = intruder.count_intruders(w, w + aligned)
    assert n == 0
    # the tuned top-10 singular vectors are W's own (cosine 1 up to float64 rounding)
    assert min(best) > 0.999 and len(best) == intruder.INTRUDER_TOP_K


def test_random_update_is_an_intruder():
    w, _, rand = _aligned_and_random()
    n, best = intruder.count_intruders(w, w + rand)
    # A random unit vector in 64 dimensions has max |cos| about sqrt(2 ln 64 / 64) ~ 0.36 to any basis vector
    # of a 64-dim orthonormal basis: well below epsilon = 0.5, so the new top direction is an intruder.
    assert n >= 1
    assert best[0] < intruder.INTRUDER_EPSILON


def test_unchanged_weight():
    w, _, _ = _aligned_and_random()
    assert intruder.count_intruders(w, w.clone())[0] == 0


@pytest.fixture(scope="module")
def crafted(tiny_model_dir, tmp_path_factory):
    """Two adapters on the tiny Llama's q_proj/v_proj: one aligned with W's top directions, one random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("intruder")
    out = {}
    for kind in ("aligned", "random"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, mod in peft_model.named_modules():
                if not hasattr(mod, "lora_A") or "default" not in mod.lora_A:
                    continue
                w = mod.base_layer.weight
                u, s, vh = torch.linalg.svd(w.double())
                scale = mod.scaling["default"]
                if kind == "aligned":  # B A = U_r diag(2 s_r) V_r^T / scale
                    mod.lora_A["default"].weight.copy_(vh[:4].float())
                    mod.lora_B["default"].weight.copy_((u[:, :4] @ torch.diag(2 * s[:4])).float() / scale)
                else:  # a random rank-4 update 3x larger than W's top singular value
                    a = torch.linalg.qr(torch.randn(w.shape[1], 4, generator=g, dtype=torch.float64)).Q.T
                    b = torch.linalg.qr(torch.randn(w.shape[0], 4, generator=g, dtype=torch.float64)).Q
                    mod.lora_A["default"].weight.copy_(a.float())
                    mod.lora_B["default"].weight.copy_((b * 3 * s[0]).float() / scale)
        peft_model.save_pretrained(root / kind)
        out[kind] = root / kind
    return out


def test_adapter_counts(tiny_model_dir, crafted):
    aligned = intruder.adapter_intruders(tiny_model_dir, crafted["aligned"])
    rand = intruder.adapter_intruders(tiny_model_dir, crafted["random"])
    assert aligned.summary.modules == 4  # 2 layers x (q_proj, v_proj)
    assert aligned.summary.total == 0
    assert rand.summary.total >= 4 and rand.summary.modules_with_intruders == 4
    assert {m.module for m in rand.per_module} == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                                                    for p in ("q_proj", "v_proj")}


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_tuned_weight_matches_peft_merge(tiny_model_dir, tmp_path, variant):
    """The tuned weight rebuilt from the adapter file alone equals peft's merge_and_unload (independent source)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    import json
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_rslora=variant == "rslora",
                     use_dora=variant == "dora")
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))
    peft_model.save_pretrained(tmp_path / "ad")
    tensors = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    acfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    merged = dict(peft_model.merge_and_unload().named_parameters())
    base = intruder._Weights(tiny_model_dir)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.o_proj"):
        got = intruder.tuned_from_adapter(base.get(f"{module}.weight"), tensors, acfg, module)
        assert torch.allclose(got, merged[f"{module}.weight"], atol=1e-5), module


def test_full_run_compare(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path / "same")
    same = intruder.full_intruders(tiny_model_dir, tmp_path / "same", ["q_proj", "v_proj"])
    assert same.source == "full" and same.summary.modules == 4 and same.summary.total == 0
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        a, b = torch.randn(w.shape[0]), torch.randn(w.shape[1])
        w += 3 * torch.linalg.matrix_norm(w, 2) * torch.outer(a / a.norm(), b / b.norm())
    model.save_pretrained(tmp_path / "changed")
    changed = intruder.full_intruders(tiny_model_dir, tmp_path / "changed", ["q_proj", "v_proj"])
    by = {m.module: m.intruders for m in changed.per_module}
    assert by["model.layers.0.self_attn.q_proj"] >= 1 and by["model.layers.1.self_attn.q_proj"] == 0


def test_layer_of():
    assert intruder.layer_of("model.layers.12.self_attn.q_proj") == 12
    assert intruder.layer_of("lm_head") is None


def test_per_layer_and_min_cos(tiny_model_dir, crafted):
    rand = intruder.adapter_intruders(tiny_model_dir, crafted["random"])
    counts, cos = intruder.per_layer(rand), intruder.layer_min_cos(rand)
    assert set(counts) == set(cos) == {0, 1}
    assert sum(counts.values()) == rand.summary.total
    assert all(c < intruder.INTRUDER_EPSILON for c in cos.values())  # each layer has an intruder
    aligned = intruder.layer_min_cos(intruder.adapter_intruders(tiny_model_dir, crafted["aligned"]))
    assert all(c > 0.999 for c in aligned.values())
