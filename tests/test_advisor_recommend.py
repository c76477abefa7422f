"""The advisor end to end with the real estimator: the seed's use cases and matrix rows as scenarios, physics
overriding the seed where they disagree, nothing-fits, renting, the run spec, the CLI, and a property test.

Expected methods and rank ranges come from the seed article (shared/seed/000_7e8640b06c7a51b7.txt), quoted in each
scenario. Where the estimator's physics says otherwise, the test asserts the physics and says so.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from advisor.answers import Answers
from advisor.recommend import recommend
from advisor.result import NothingFits, Recommendation
from estimator import estimate
from estimator.catalog import get_gpu, list_gpus, model_ids

GIB = 2**30


def _fits_given_gpus(rec: Recommendation, answers: Answers) -> None:
    """The recommended configuration, re-estimated from scratch, fits the user's GPUs and budget."""
    req = rec.estimate_request()
    est = estimate(req)
    assert est.fits, rec.estimate
    assert est.memory.peak_bytes <= est.gpu.memory_bytes
    if not answers.rent_in_cloud:
        assert req.gpu == answers.gpu and req.num_gpus <= answers.num_gpus
    if rec.cost_usd is not None:
        assert rec.cost_usd <= answers.budget_usd + 1e-9
    assert req.method == rec.method and (rec.rank is None or req.rank == rec.rank)


def _lora_fits_by_physics(rec: Recommendation, gpu_gib: float, peak_gib: tuple[float, float]) -> None:
    """The seed runs these cases as 16-bit LoRA on one 24/48/80 GiB card, and so does the runner: a bf16 run loads
    the frozen base in bf16 (runner/train/recipe.py lora_base_dtype, 2 B per weight) with fp32 adapters, which is what the
    estimator counts. Physics then agrees with the seed: LoRA fits, with the figure in ``peak_gib`` (estimator,
    micro-batch 4; before the 16-bit base it counted an fp32 base and rejected LoRA for QLoRA)."""
    assert rec.method == "lora" and rec.quantization == "none"
    lora = [r for r in rec.reasons if r.kind == "physics" and r.rule == "l_lora"]
    assert lora and lora[0].effect == "chosen" and "fits" in lora[0].answer and "GiB per GPU" in lora[0].answer
    peak = rec.estimate["memory"]["peak_bytes"]
    assert peak <= gpu_gib * GIB
    # the bf16 base alone is 2 B per parameter, so the peak can never be below it
    assert peak > 2 * rec.estimate["model"]["total_params"]
    assert peak_gib[0] * GIB <= peak <= peak_gib[1] * GIB, peak / GIB


def _model(*candidates: str) -> str:
    """The first catalog model of a list (the catalog grows; scenarios prefer the seed's own model)."""
    ids = set(model_ids())
    for c in candidates:
        if c in ids:
            return c
    pytest.skip(f"none of {candidates} in the catalog")


# ------------------------------------------------------------------------------------------ seed use cases
def test_healthcare_use_case_is_lora_r16():
    # Seed, Use Case 1: "Base Model: LLaMA-2-7B / Dataset: 10,000 anonymized clinical conversations / Training:
    # LoRA (r=16, α=32) / Hardware: 1× RTX A6000 (48GB) / Cost: ~$100", on-premise (HIPAA), accuracy 94%.
    answers = Answers(model="llama-2-7b", examples=10_000, tokens_per_example=512, gpu="rtx-a6000", num_gpus=1,
                      budget_usd=100, deployment="on-prem", accuracy_pct=94, complexity="summarization",
                      domain="different")
    rec = recommend(answers)
    # The rules want LoRA ("m_lora_if": budget < $5,000) with r=16, alpha=32 as in the seed.
    assert "m_lora_if" in [r.rule for r in rec.reasons]
    assert rec.rank == 16 and rec.alpha == 32
    assert rec.learning_rate == pytest.approx(2e-4)
    # estimator: 28.9 GiB allocated at micro-batch 4 x 512 tokens, 31.2 GiB on the card with the caching allocator
    # and the CUDA context (53.2 GiB with the old fp32 base, which chose QLoRA)
    _lora_fits_by_physics(rec, 48, (30, 33))
    _fits_given_gpus(rec, answers)
    # the path cites the seed's tree and the rank guide
    rules = [r.rule for r in rec.reasons]
    assert "q1_under_1k" in rules and "c_rank_summarization" in rules and "m_lora_if" in rules


def test_legal_use_case_is_full_on_eight_a100():
    # Seed, Use Case 2: "50,000 labeled M&A contracts / Full fine-tuning all parameters / 8× A100 GPUs (cloud) /
    # Cost: ~$25,000", accuracy 98.5%, single task. GPT-3.5 is not open: a 7B stands in.
    answers = Answers(model="llama-2-7b", examples=50_000, tokens_per_example=1024, gpu="a100-80gb", num_gpus=8,
                      budget_usd=25_000, accuracy_pct=98.5, num_tasks=1, complexity="reasoning", domain="different")
    rec = recommend(answers)
    assert rec.method == "full" and rec.rank is None
    assert rec.sharding in ("zero3", "fsdp") and rec.num_gpus == 8
    assert 1e-5 <= rec.learning_rate <= 5e-5  # "Full Fine-Tuning: lr = 1e-5 to 5e-5"
    _fits_given_gpus(rec, answers)
    # Physics disagrees with the seed's cost: the estimate is far below its ~$25,000 (a 7B, not GPT-3.5).
    assert rec.cost_usd < 25_000


def test_ecommerce_use_case_is_lora_r8():
    # Seed, Use Case 3: "Base Model: Qwen-7B / Training: 10 separate LoRA adapters (r=8) / Hardware: 1× RTX 4090 /
    # Total cost: ~$300", rapid product launches.
    model = _model("qwen2.5-7b", "qwen-7b", "llama-2-7b")
    answers = Answers(model=model, num_tasks=10, gpu="rtx-4090", budget_usd=300, rapid_updates=True,
                      complexity="summarization", examples=5_000, tokens_per_example=256)
    rec = recommend(answers)
    assert rec.rank == 8
    # estimator: plain LoRA at micro-batch 4 x 256 tokens allocates 23.7 GiB (Qwen2.5's 152k-token vocabulary
    # makes the logits large): with the caching allocator and the CUDA context that is ~26 GiB on a card whose
    # usable memory is 23.99 GiB (nvidia-smi 24564 MiB), so it does not fit (issue 10: it used to be recommended
    # at 23.7 of 24.0 GiB with no margin); the ladder moves on and the recommendation keeps a positive margin
    lora = [r for r in rec.reasons if r.kind == "physics" and r.rule == "l_lora"]
    assert lora and lora[0].effect != "chosen" and "needs" in lora[0].answer
    assert rec.estimate["memory"]["margin_bytes"] >= 0
    _fits_given_gpus(rec, answers)
    # one base + 10 adapters is far smaller than 10 full copies ("14.4GB (vs 140GB for 10 full models)")
    full = next(a for a in rec.alternatives if a.method == "full")
    assert full.fits is False  # physics: full fine-tuning of a 7B does not fit one 24 GiB card


def test_multilingual_use_case_is_lora_r16():
    # Seed, Use Case 4: "Multilingual LLaMA-2-13B / Training: 20 language adapters (r=16)".
    model = _model("llama-2-13b", "llama-2-7b")
    answers = Answers(model=model, num_tasks=20, gpu="a100-80gb", budget_usd=2_000, complexity="summarization",
                      domain="different", examples=5_000, tokens_per_example=256)
    rec = recommend(answers)
    assert rec.rank == 16
    # 13B on an A100 80GB, estimator: 37.3 GiB allocated, 40.3 GiB on the card (84.9 GiB with the old fp32 base,
    # which chose QLoRA)
    _lora_fits_by_physics(rec, 80, (38, 42))
    assert "mx_multilingual" in [r.rule for r in rec.reasons]
    _fits_given_gpus(rec, answers)


def test_accuracy_over_98_pct_on_one_a100_gets_pure_bf16_full_fine_tuning():
    # Issue 10: a user who needs >98% accuracy with a 7B model on one A100-80GB was sent to LoRA because only fp32
    # master weights were known (~135 GiB). Pure bf16 with checkpointing (torchtune / TRL with a bf16 model)
    # allocates ~67.5 GiB (fms-acceleration measured 67.96 GiB for the same run at 4 x 4096): the lean full rung
    # comes before any other method.
    answers = Answers(model="mistral-7b", gpu="a100-80gb", num_gpus=1, accuracy_pct=99, budget_usd=10_000,
                      examples=20_000, tokens_per_example=1024, complexity="reasoning", domain="different")
    rec = recommend(answers)
    assert rec.method == "full" and rec.gradient_checkpointing
    assert rec.run_spec["master_dtype"] == "bf16"
    physics = [(r.rule, r.effect) for r in rec.reasons if r.kind == "physics" and r.rule.startswith("l_")]
    assert physics[0][0] == "l_full" and physics[0][1] != "chosen"
    assert ("l_pure_bf16", "chosen") in physics
    assert rec.estimate["memory"]["margin_bytes"] >= 0
    _fits_given_gpus(rec, answers)



def test_no_pure_bf16_on_a_card_without_bf16():
    # The V100 has no bf16 (NVIDIA datasheet, data/gpus.csv) and pure fp16 has no loss scaling, so the lean full
    # rungs cannot run there. Before, they were still tried, fell back to fp32 master weights (the same figure as
    # the plain checkpointing rung, 148.5 GiB) and the verdicts said "pure bf16" for a run that would not be.
    answers = Answers(model="mistral-7b", gpu="v100-32gb", num_gpus=1, accuracy_pct=99, budget_usd=10_000,
                      examples=20_000, tokens_per_example=1024, complexity="reasoning", domain="different")
    rec = recommend(answers)
    rungs = [r.rule for r in rec.reasons if r.kind == "physics"]
    assert "l_full" in rungs and "l_pure_bf16" not in rungs and "l_pure_bf16_8bit" not in rungs
    assert not any("pure bf16" in (r.answer or "") for r in rec.reasons)
    assert rec.run_spec.get("master_dtype", "fp32") == "fp32"
    # and on an A100 (bf16) the same answers do try them, and name the regime in the verdict
    rec = recommend(answers.model_copy(update={"gpu": "a100-80gb"}))
    pure = [r for r in rec.reasons if r.rule == "l_pure_bf16"]
    assert pure and "pure bf16" in pure[0].answer


def test_full_on_two_gpus_that_fits_only_in_pure_bf16_under_fsdp():
    # Issue 10: Llama-2-13B, full fine-tuning wanted (>98% accuracy), 2x A100-80GB. fp32 master weights do not fit
    # even sharded (16 B per parameter before activations), pure bf16 replicated by DDP does not fit either
    # (8 B per parameter = ~97 GiB on each card), pure bf16 sharded by FSDP does (~4 B per parameter per card).
    from runner.estimate_request import estimate_request
    from runner.spec import RunSpec

    answers = Answers(model="llama-2-13b", gpu="a100-80gb", num_gpus=2, accuracy_pct=99, budget_usd=50_000,
                      examples=20_000, tokens_per_example=1024, complexity="reasoning", domain="different")
    rec = recommend(answers)
    assert rec.method == "full" and rec.sharding == "fsdp" and rec.num_gpus == 2
    assert rec.run_spec["master_dtype"] == "bf16" and rec.run_spec["distribution"]["strategy"] == "fsdp"
    physics = [(r.rule, r.effect) for r in rec.reasons if r.kind == "physics" and r.rule.startswith("l_")]
    assert physics[0][0] == "l_full" and physics[0][1] != "chosen" and ("l_pure_bf16", "chosen") in physics
    _fits_given_gpus(rec, answers)
    # The RunSpec validates as the runner reads it, and maps to exactly the estimate shown.
    spec = RunSpec.model_validate(rec.to_run_spec("train.jsonl").model_dump(mode="json"))
    assert (spec.method, spec.master_dtype, spec.precision) == ("full", "bf16", "bf16")
    assert spec.distribution.strategy == "fsdp" and spec.distribution.world_size == 2
    req = estimate_request(spec, gpu="a100-80gb", examples=answers.examples,
                           tokens_per_example=answers.tokens_per_example)
    assert req.model_dump() == rec.estimate_request().model_dump()
    assert estimate(req).memory.peak_bytes == rec.estimate["memory"]["peak_bytes"]
    # Only FSDP makes pure bf16 fit here: the same spec replicated by DDP, or with fp32 master weights, does not.
    ddp = spec.model_copy(update={"distribution": spec.distribution.model_copy(update={"strategy": "ddp"})})
    assert not estimate(estimate_request(ddp, gpu="a100-80gb")).fits
    mixed = spec.model_copy(update={"master_dtype": "fp32"})
    assert not estimate(estimate_request(mixed, gpu="a100-80gb")).fits


def test_edge_deployment_is_qlora_r4_to_8():
    # Seed, Quick Selection Matrix: "| Edge device deployment | QLoRA | r=4-8, quantized |".
    answers = Answers(model="llama-2-7b", gpu="rtx-4090", deployment="edge", budget_usd=500)
    rec = recommend(answers)
    assert rec.method == "qlora" and 4 <= rec.rank <= 8 and rec.quantization == "nf4"
    _fits_given_gpus(rec, answers)


def test_huge_model_qlora_does_not_load_sharded_and_the_advisor_says_why():
    # Seed, Quick Selection Matrix: "| >100B model, limited hardware | QLoRA | r=8-16, 4-bit |". Llama-3.1-405B on
    # 4x H200: its step fits with ZeRO-3 (69.2 GiB per GPU), but transformers 5 loads a bitsandbytes model whole on
    # every GPU before ZeRO-3 / FSDP shard it (its rank-0 loading skips quantized models; bitsandbytes' loader
    # places the model on the rank's GPU), so each H200 would have to hold the ~220 GiB NF4 base at load. The
    # advisor used to recommend this run; the runner would fail while loading. It now says nothing fits, and why.
    answers = Answers(model="llama-3.1-405b", gpu="h200-141gb", num_gpus=4, budget_usd=20_000, examples=2_000,
                      tokens_per_example=256)
    with pytest.raises(NothingFits) as info:
        recommend(answers)
    closest = str(info.value).split("closest:", 1)[1].splitlines()[0]
    assert "ZeRO-3" in closest and "trains in 69.2 GiB per GPU" in closest, closest
    assert re.search(r"loading needs 2\d\d\.\d GiB \(each GPU loads the whole 4-bit model", closest), closest


def test_70b_qlora_on_one_48gb_card():
    # Seed, Advanced Topics / QLoRA: "Train 65B parameter models on a single 48GB GPU!" and "Memory usage: ~40GB for
    # 70B model". Physics agrees once gradient checkpointing is on (the estimator: ~40 GiB on an RTX A6000).
    answers = Answers(model="llama-2-70b", gpu="rtx-a6000", budget_usd=1_000, examples=2_000, tokens_per_example=256)
    rec = recommend(answers)
    assert rec.method == "qlora" and rec.gradient_checkpointing
    assert rec.estimate["memory"]["peak_bytes"] <= 48 * GIB
    _fits_given_gpus(rec, answers)


def test_enterprise_single_critical_task_is_full():
    # Seed, Quick Selection Matrix: "| Enterprise, single critical task | Full Fine-Tuning | All parameters |".
    # A 0.5B model: full fine-tuning fits one A100 80GB.
    answers = Answers(model="qwen2.5-0.5b", gpu="a100-80gb", accuracy_pct=99, budget_usd=20_000, num_tasks=1)
    rec = recommend(answers)
    assert rec.method == "full"
    _fits_given_gpus(rec, answers)


def test_research_row_reasoning_rank_16_to_32():
    # Seed, Quick Selection Matrix: "| Research, multiple experiments | LoRA | r=16-32 |"; rank guide:
    # "Complex (reasoning) → r=16-32".
    answers = Answers(model="qwen2.5-0.5b", gpu="rtx-4090", complexity="reasoning", budget_usd=500)
    rec = recommend(answers)
    assert rec.method == "lora" and 16 <= rec.rank <= 32


def test_startup_row_is_lora_r8_to_16():
    # Seed, Quick Selection Matrix: "| Startup, limited GPU, 3+ tasks | LoRA | r=8-16 |".
    answers = Answers(model="qwen2.5-0.5b", gpu="rtx-3090", num_tasks=4, budget_usd=800)
    rec = recommend(answers)
    assert rec.method == "lora" and 8 <= rec.rank <= 16


# ------------------------------------------------------------------------------------------ physics wins
def test_full_7b_on_one_4090_does_not_fit_so_the_ladder_goes_down():
    # The seed's tree says ">98% required: → Full fine-tuning", but physics: full fine-tuning of a 7B needs far more
    # than 24 GiB (the seed itself: "Full Fine-Tuning (7B parameters) ... Total: ~90GB"). The advisor rejects full
    # with the figure, walks down the ladder, and spells out the trade-off.
    answers = Answers(model="llama-2-7b", gpu="rtx-4090", accuracy_pct=99, budget_usd=300)
    rec = recommend(answers)
    assert rec.method in ("lora", "qlora")
    rejected = [r for r in rec.reasons if r.kind == "physics" and r.rule == "l_full"]
    assert rejected and "GiB per GPU" in rejected[0].answer and "24.0 GiB" in rejected[0].answer
    assert any(w.startswith("Trade-off") for w in rec.warnings)
    assert rec.rank >= 64 and rec.dora  # "try higher rank LoRA (r=64-128) or try DoRA/LoRA+ variants"
    _fits_given_gpus(rec, answers)


def test_conflict_accuracy_99_with_300_dollars_is_explicit():
    # A 0.5B model where full fine-tuning fits the GPU: budget vs accuracy. Q1 ("< $1,000: → LoRA") conflicts with
    # Q4 (">98% required: → Full fine-tuning"); the advisor reports the conflict and how it was resolved.
    answers = Answers(model="qwen2.5-0.5b", gpu="a100-80gb", accuracy_pct=99, budget_usd=300)
    rec = recommend(answers)
    assert any("Conflict" in w and "What's your budget?" in w for w in rec.warnings) or rec.method != "full"
    if rec.method == "full":  # physics: full of a 0.5B costs far less than $300, so the accuracy wish wins
        assert rec.cost_usd <= 300


def test_over_budget_is_rejected_with_the_figure():
    # The same 7B LoRA plan with a budget of one cent: every rung is over budget -> explicit nothing-fits.
    answers = Answers(model="llama-2-7b", gpu="rtx-4090", budget_usd=0.01)
    with pytest.raises(NothingFits) as info:
        recommend(answers)
    result = info.value.result
    assert result.fits is False and result.closest is not None
    assert "budget" in result.message and "$0.01" in result.message
    assert any("budget of at least" in n for n in result.needed)


def test_nothing_fits_names_the_closest_option_and_what_it_needs():
    # A 7B with 4,096-token examples on one T4 (16 GiB): the 4-bit base alone is ~3.5 GiB, but the fp32 LoRA
    # activations of 4k tokens with a 32k vocabulary's logits exceed the card even at micro-batch 1 with
    # checkpointing (estimator figures). Whatever physics says, the advisor never presents a non-fitting plan.
    answers = Answers(model="llama-2-7b", gpu="t4", tokens_per_example=4096, examples=1000, budget_usd=1e6,
                      complexity="coding")
    try:
        rec = recommend(answers)
    except NothingFits as exc:
        assert "nothing fits" in str(exc) and exc.result.fits is False
        assert exc.result.closest is not None and exc.result.needed
        assert not exc.result.closest.fits
    else:  # if physics says it fits, it must really fit
        _fits_given_gpus(rec, answers)


def test_renting_picks_the_cheapest_fitting_gpu():
    answers = Answers(model="qwen2.5-0.5b", rent_in_cloud=True, gpu=None, budget_usd=1_000)
    rec = recommend(answers)
    _fits_given_gpus(rec, answers)
    # No other catalog GPU runs the same configuration cheaper.
    req = rec.estimate_request()
    for gpu in list_gpus():
        other = estimate(req.model_copy(update={"gpu": gpu.id, "dtype": "bf16" if gpu.bf16_support else "fp16"}))
        if other.fits and other.compute and other.compute.cost_usd is not None:
            assert rec.cost_usd <= other.compute.cost_usd * answers.num_tasks + 1e-9, gpu.id


# ------------------------------------------------------------------------------------------ outputs
def test_run_spec_needs_no_edits(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    rec = recommend(Answers(model="llama-2-7b", gpu="rtx-4090", deployment="edge"))
    spec = rec.to_run_spec(str(data))
    assert spec.method == "qlora" and spec.quantization == "nf4"
    assert spec.peft.r == rec.rank and spec.peft.alpha == rec.alpha and spec.peft.target_modules == rec.target_modules
    assert spec.learning_rate == rec.learning_rate and spec.seq_len == rec.seq_len
    assert spec.micro_batch_size == rec.micro_batch_size
    assert spec.gradient_accumulation_steps == rec.gradient_accumulation_steps
    assert spec.dataset.path == str(data)
    assert rec.to_run_spec(str(data), epochs=1.0, name="x").epochs == 1.0


def test_run_spec_of_multi_gpu_full():
    rec = recommend(Answers(model="qwen2.5-0.5b", gpu="a100-80gb", num_gpus=2, accuracy_pct=99, budget_usd=20_000))
    spec = rec.to_run_spec("data.jsonl")
    assert spec.method == "full" and spec.distribution.nproc_per_node == 2
    assert spec.distribution.strategy in ("zero3", "fsdp")


def test_recommendation_is_json_and_the_decision_path_is_drawable():
    rec = recommend(Answers(model="qwen2.5-0.5b", gpu="rtx-4090"))
    data = json.loads(rec.model_dump_json())
    for key in ("method", "rank", "alpha", "target_modules", "learning_rate", "quantization", "estimate", "reasons",
                "alternatives", "warnings", "decision_path"):
        assert key in data
    assert [n["id"] for n in data["decision_path"]][:6] == ["q1", "q2", "q3", "q4", "q5", "q6"]
    for node in data["decision_path"]:
        assert sum(o["chosen"] for o in node["options"]) == 1, node["id"]
    assert {a["method"] for a in data["alternatives"]} == {"full", "lora", "qlora"} - {data["method"]}


def test_cli_json_and_text(capsys):
    from ftadvisor.cli import main

    assert main(["advise", "--model", "qwen2.5-0.5b", "--gpu", "rtx-4090", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "lora" and data["rank"] == 16
    assert main(["advise", "--model", "qwen2.5-0.5b", "--gpu", "rtx-4090", "--complexity", "coding"]) == 0
    out = capsys.readouterr().out
    assert "Recommendation: LoRA" in out and "Why, step by step" in out and "Alternatives" in out


def test_cli_nothing_fits_exit_1(capsys):
    from ftadvisor.cli import main

    assert main(["advise", "--model", "llama-2-7b", "--gpu", "rtx-4090", "--budget", "0.01"]) == 1
    assert "Nothing fits" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ one spec, one figure
def _handed_over_request(rec: Recommendation):
    """The request of the run the advisor hands over, through the one mapping (runner/estimate_request.py)."""
    from runner.estimate_request import estimate_request

    spec = rec.to_run_spec("train.jsonl")
    return estimate_request(spec, gpu=rec.gpu, examples=rec.answers.examples,
                            tokens_per_example=rec.answers.tokens_per_example)


def _shows_the_handed_over_run(rec: Recommendation) -> None:
    req = _handed_over_request(rec)
    assert req == rec.estimate_request()
    assert req.grad_accum_steps == rec.gradient_accumulation_steps  # the miss: it was left at 1
    est = estimate(req)
    assert est.memory.peak_bytes == rec.estimate["memory"]["peak_bytes"]
    assert est.fits == rec.estimate["fits"]


def test_the_figure_shown_is_the_figure_of_the_run_handed_over():
    # The case: Llama-2-7B on an A100-80GB, LoRA r=16, micro-batch 4 x accumulation 4 (seed, Practice 2).
    # Before, the advisor estimated accumulation 1 while the handed-over run accumulates 4 (the accumulated LoRA
    # gradients stay allocated): 28.92 vs 28.99 GiB allocated with the estimator of that day, 31.12 vs 31.19 GiB
    # on the card with today's (caching allocator + CUDA context); the issue measured 60.51 vs 61.11 GiB with the
    # older fp32 LoRA base. Measured with this repository's estimator.
    rec = recommend(Answers(gpu="a100-80gb"))
    assert rec.method == "lora" and (rec.micro_batch_size, rec.gradient_accumulation_steps) == (4, 4)
    _shows_the_handed_over_run(rec)
    one = estimate(rec.estimate_request().model_copy(update={"grad_accum_steps": 1}))
    assert rec.estimate["memory"]["peak_bytes"] > one.memory.peak_bytes


# ------------------------------------------------------------------------------------------ fair alternatives
HEAVIER_FIRST = ("full", "lora", "qlora")


def _shown(rec: Recommendation) -> dict:
    """method -> (peak bytes, knobs text) as the recommendation shows them (the winner included)."""
    knobs = ("checkpointing" if rec.gradient_checkpointing else "no checkpointing") + \
        f", micro-batch {rec.micro_batch_size}x{rec.gradient_accumulation_steps}"
    out = {rec.method: (rec.estimate["memory"]["peak_bytes"], knobs)}
    for a in rec.alternatives:
        out[a.method] = (a.peak_bytes, a.knobs)
    return out


def _memory_order_holds(rec: Recommendation) -> None:
    """A lighter method is never shown needing more than a heavier one at different knobs."""
    shown = _shown(rec)
    for i, heavy in enumerate(HEAVIER_FIRST):
        for light in HEAVIER_FIRST[i + 1:]:
            (ph, kh), (pl, kl) = shown[heavy], shown[light]
            if ph is None or pl is None or pl <= ph:
                continue
            assert kh.split(", ")[:2] == kl.split(", ")[:2], (heavy, shown[heavy], light, shown[light])


def test_alternatives_are_compared_at_fair_knobs():
    # The case, default answers (Llama-2-7B, one RTX 4090): LoRA r=16 fits with checkpointing (15.0 GiB
    # before the estimator's latest figures). Before, QLoRA was shown at its base rung, without checkpointing,
    # "needing 24.2 GiB" and not fitting: more than the LoRA it is lighter than.
    rec = recommend(Answers())
    assert rec.method == "lora" and rec.gradient_checkpointing
    _shows_the_handed_over_run(rec)
    lora_peak = rec.estimate["memory"]["peak_bytes"]
    qlora = next(a for a in rec.alternatives if a.method == "qlora")
    full = next(a for a in rec.alternatives if a.method == "full")
    # QLoRA's base rung (no checkpointing) does not fit 24 GiB, so its first fitting rung is checkpointing at
    # micro-batch 4x4: the recommendation's checkpointing and micro-batch, and the text says so. Its optimizer is
    # its own, 8-bit AdamW (the run below that gives the same figure uses paged-adamw-8bit), and the knobs say so.
    assert qlora.at == "own_rung" and qlora.knobs == "checkpointing, micro-batch 4x4, 8-bit AdamW"
    assert qlora.why_not.startswith("At its own first fitting rung (checkpointing, micro-batch 4x4, 8-bit AdamW; "
                                    "the recommendation's checkpointing and micro-batch)")
    assert qlora.fits and qlora.peak_bytes <= lora_peak
    # Independent of the advisor's own loop: the same run as LoRA's with QLoRA's method settings, estimated
    # through the mapping, gives the figure shown.
    from runner.estimate_request import estimate_request

    spec = rec.to_run_spec("train.jsonl", method="qlora", quantization="nf4", optimizer="paged-adamw-8bit")
    again = estimate(estimate_request(spec, gpu=rec.gpu, examples=rec.answers.examples,
                                      tokens_per_example=rec.answers.tokens_per_example))
    assert again.memory.peak_bytes == qlora.peak_bytes
    # Full fine-tuning fits no rung on one 24 GiB card: shown at the recommendation's knobs, named.
    assert not full.fits and full.at == "winner_knobs" and full.knobs == "checkpointing, micro-batch 4x4"
    assert full.why_not.startswith("At the recommendation's knobs (checkpointing, micro-batch 4x4)")
    assert "fits no rung of the ladder" in full.why_not
    assert full.peak_bytes >= lora_peak
    _memory_order_holds(rec)


# A configuration in words inside a why-not, e.g. "QLoRA (r=16, checkpointing, micro-batch 4x4, 8-bit AdamW)".
_NAMED = re.compile(r"(?:full fine-tuning|LoRA|QLoRA) \(([^)]*)\)")


@pytest.mark.parametrize("answers", [
    dict(),  # Llama-2-7B, one RTX 4090: QLoRA (paged 8-bit AdamW) beside LoRA (AdamW)
    dict(gpu="a100-80gb"),  # full fine-tuning shown at its pure-bf16 rung
    dict(gpu="a100-80gb", num_gpus=4, accuracy_pct=99, budget_usd=5_000),  # full over 4 GPUs with ZeRO-3
], ids=["rtx-4090", "a100-80gb", "4x-a100"])
def test_an_alternative_names_the_knobs_of_its_own_figures(answers):
    # Before, two functions worded the knobs: the QLoRA alternative's header said "checkpointing, micro-batch 4x4"
    # while its why-not named "QLoRA (r=16, checkpointing, 8-bit AdamW, micro-batch 4x4)".
    rec = recommend(Answers(**answers))
    assert rec.alternatives
    for alt in rec.alternatives:
        where, _, rest = alt.why_not.partition(": ")
        assert where.startswith("At ") and f"({alt.knobs}" in where, alt.why_not  # the opening names the header's
        named = _NAMED.search(rest)
        assert named, alt.why_not
        knobs = [b for b in named.group(1).split(", ") if not b.startswith("r=")]
        assert ", ".join(knobs) == alt.knobs, (alt.knobs, alt.why_not)


def test_alternatives_text_reaches_the_cli(capsys):
    from ftadvisor.cli import main

    assert main(["advise", "--model", "qwen2.5-0.5b", "--gpu", "rtx-4090"]) == 0
    out = capsys.readouterr().out
    assert "At its own first fitting rung (" in out or "At the recommendation's knobs (" in out


# ------------------------------------------------------------------------------------------ property
SMALL_MODELS = ["smollm2-135m", "qwen2.5-0.5b", "gpt2"]


def _random_answers(draw_tokens, models):
    return st.builds(
        Answers,
        model=st.sampled_from(models),
        gpu=st.sampled_from(["t4", "rtx-4090", "a100-80gb", "v100-32gb"]),
        num_gpus=st.sampled_from([1, 2, 8]),
        budget_usd=st.sampled_from([0.001, 5.0, 300.0, 20_000.0]),
        num_tasks=st.integers(1, 30),
        accuracy_pct=st.sampled_from([80.0, 96.0, 99.0]),
        deployment=st.sampled_from(["edge", "cloud", "on-prem"]),
        rapid_updates=st.booleans(),
        continual=st.sampled_from(["none", "sequential", "critical"]),
        complexity=st.sampled_from(["simple", "summarization", "reasoning", "coding"]),
        domain=st.sampled_from(["close", "different"]),
        tokens_per_example=st.sampled_from(draw_tokens),
        examples=st.sampled_from([100, 2_000, 50_000]),
    )


def _check_property(answers: Answers) -> None:
    try:
        rec = recommend(answers)
    except NothingFits as exc:
        assert exc.result.fits is False and "nothing fits" in exc.result.message
        return
    _fits_given_gpus(rec, answers)
    _shows_the_handed_over_run(rec)
    _memory_order_holds(rec)


# Default suite: a few examples (each new configuration costs the estimator a trace, 1-5 s on 2 busy cores);
# the wide version below (slow) runs 30 over more models and lengths.
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=_random_answers([128, 512], ["smollm2-135m", "qwen2.5-0.5b"]))
def test_never_recommends_what_does_not_fit(answers):
    _check_property(answers)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # each new configuration is a trace (1-5 s on a busy 2-core box)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=_random_answers([64, 512, 1024, 2048], SMALL_MODELS + ["llama-2-7b"]))
def test_never_recommends_what_does_not_fit_wide(answers):
    _check_property(answers)


# One spec, one figure, for random answers: the request of the run handed over (to_run_spec through the one
# mapping) is the request behind the figure shown, and re-estimating it gives the same peak and verdict; the
# alternatives keep the memory order. Cheap path: SmolLM2-135M at 64 tokens on 16-bit GPUs, answers that move
# the method, the rungs and the cost (budget, tasks, data size) but not the adapter shape, so the whole run needs
# about 7 traces (~10 s on an idle 2-core box, up to a minute when it is shared); every other estimate is a cache
# hit. The wide answers (ranks, DoRA, QLoRA, fp16, several GPUs) go through the same check in _check_property.
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers=st.builds(
    Answers,
    model=st.just("smollm2-135m"),
    tokens_per_example=st.just(64),
    gpu=st.sampled_from(["rtx-4090", "a100-80gb", "h100-80gb"]),
    budget_usd=st.sampled_from([0.5, 5.0, 20_000.0]),
    num_tasks=st.integers(1, 30),
    examples=st.integers(100, 50_000),
    epochs=st.sampled_from([1.0, 3.0]),
    domain=st.sampled_from(["close", "different"]),
))
def test_the_figure_shown_is_the_run_handed_over_for_any_answers(answers):
    try:
        rec = recommend(answers)
    except NothingFits as exc:
        assert exc.result.fits is False
        return
    _shows_the_handed_over_run(rec)
    _memory_order_holds(rec)


def test_a_moe_whose_load_does_not_fit_is_explained_as_such():
    """Phi-3.5-MoE QLoRA on one RTX 4090: the step fits (23.4 GiB on the card) but loading does not (26.1 GiB: the
    last layer's experts built in bf16 beside the 4-bit model). The closest candidate said it "needs 23.4 GiB; the
    RTX 4090 has 24.0 GiB", a contradiction; it now names the load."""
    answers = Answers(model="phi-3.5-moe", gpu="rtx-4090", num_gpus=1, budget_usd=300, examples=2000,
                      tokens_per_example=256)
    with pytest.raises(NothingFits) as info:
        recommend(answers)
    closest = str(info.value).split("closest:", 1)[1].splitlines()[0]
    assert re.search(r"trains in 23\.\d GiB per GPU but loading needs 26\.\d GiB", closest), closest
