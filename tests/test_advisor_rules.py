"""The rule file (data/rules.yaml) and the rule engine, without the estimator.

Expected values come from the seed article (shared/seed/000_7e8640b06c7a51b7.txt): every case below names the
seed line it checks. A coverage test makes sure every rule id in the file is exercised by a case here.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import pytest

from advisor.answers import Answers
from advisor.facts import make_facts
from advisor.rules import (
    RULES_PATH,
    Condition,
    RuleFileError,
    choose_method,
    configure,
    known_names,
    load_rules,
    matrix_rows,
    walk_tree,
    warnings_for,
)

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "000_7e8640b06c7a51b7.txt"
if not SEED.exists():  # the repo may be checked out elsewhere; the seed travels with the shared folder
    SEED = Path("/work/shared/seed/000_7e8640b06c7a51b7.txt")
GIB = 2**30


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def seed_text() -> str:
    if not SEED.exists():
        pytest.skip("seed article not available")
    return SEED.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def book():
    return load_rules()


def facts(params_b: float = 7.0, gpu_gib: float = 24, kind: str = "consumer", **answers):
    """Facts for a situation; default: 7B model on one 24 GiB consumer GPU, default answers."""
    return make_facts(
        Answers(**answers), model_params=int(params_b * 1e9), gpu_memory_bytes=int(gpu_gib * GIB), gpu_kind=kind
    )


# ------------------------------------------------------------------------------------------------ the file
def test_every_rule_cites_a_seed_heading_and_a_verbatim_quote(book, seed_text):
    headings = {
        line.lstrip("#").strip()
        for line in seed_text.splitlines()
        if re.match(r"^#{2,4} ", line)
    }
    seed_norm = _norm(seed_text)
    for rule in book.all_cited():
        assert rule.section in headings, f"{rule.id}: section {rule.section!r} is not a heading of the seed"
        assert _norm(rule.quote) in seed_norm, f"{rule.id}: quote {rule.quote!r} is not in the seed"


def test_ids_unique_and_conditions_name_real_fields(book):
    ids = [r.id for r in book.all_cited()]
    assert len(ids) == len(set(ids))
    names = known_names()
    assert set(Answers.model_fields) <= names
    for rule in book.all_cited():
        when = getattr(rule, "when", None)
        if when:
            assert Condition(when, names).names <= names
    for rule in book.warnings:  # message placeholders are facts too
        fields = {f for _, f, _, _ in string.Formatter().parse(rule.message) if f}
        assert fields <= names, rule.id


def test_the_tree_is_the_seeds_six_questions(book):
    # The seed's "The Complete Decision Tree" has Q1..Q6: budget, GPU, tasks, accuracy, deployment, continual.
    assert [q.question for q in book.tree] == [
        "What's your budget?",
        "What GPU do you have?",
        "How many tasks?",
        "Accuracy requirements?",
        "Deployment constraints?",
        "Continual learning needed?",
    ]


def test_the_matrix_has_the_seeds_eight_rows(book, seed_text):
    table = seed_text.split("### Quick Selection Matrix", 1)[1].split("\n---\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Your Situation" not in line]
    assert {r.quote for r in book.matrix} == set(rows)
    assert len(rows) == 8 and len(book.matrix) == 8


def test_a_broken_rule_file_is_refused(tmp_path):
    bad = tmp_path / "rules.yaml"
    text = RULES_PATH.read_text(encoding="utf-8")
    bad.write_text(text.replace('when: "budget_usd < 1000"', 'when: "budget < 1000"'), encoding="utf-8")
    with pytest.raises(RuleFileError, match="unknown facts.*budget"):
        load_rules(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text(text.replace("id: q1_1k_to_10k", "id: q1_under_1k"), encoding="utf-8")
    with pytest.raises(RuleFileError, match="used twice"):
        load_rules(dup)


# ------------------------------------------------------------------------------------- condition language
@pytest.mark.parametrize(
    "text",
    ["__import__('os').system('true')", "budget_usd.real", "open('x')", "[x for x in examples]", "budget_usd + 1 > 2",
     "lambda: 1", "examples[0]"],
)
def test_conditions_accept_no_code(text):
    with pytest.raises(RuleFileError):
        Condition(text, known_names())


def test_condition_evaluation():
    f = {"a": 3, "b": "x", "c": True}
    names = set(f)
    assert Condition("a < 4 and b == 'x'", names).holds(f)
    assert Condition("not (a > 4) or c", names).holds(f)
    assert Condition("b in ['x', 'y']", names).holds(f)
    assert not Condition("b not in ['x', 'y']", names).holds(f)
    assert Condition("1 < a <= 3", names).holds(f)
    with pytest.raises(RuleFileError, match="unknown facts"):
        Condition("d > 1", names)


# ------------------------------------------------------------------------------------------ tree branches
# branch id -> (answers / derived overrides). Each case must take exactly that branch of its question.
TREE_CASES = {
    "q1_under_1k": dict(budget_usd=999),
    "q1_1k_to_10k": dict(budget_usd=10_000),
    "q1_over_10k": dict(budget_usd=10_001),
    "q2_rent": dict(rent_in_cloud=True),
    "q2_consumer": dict(kind="consumer"),
    "q2_single_small_model": dict(kind="datacenter", params_b=3, gpu_gib=80),
    "q2_single_large_model": dict(kind="datacenter", params_b=7, gpu_gib=80),
    "q2_cluster": dict(kind="datacenter", gpu_gib=80, num_gpus=8),
    "q3_one": dict(num_tasks=1),
    "q3_two_to_five": dict(num_tasks=5),
    "q3_more_than_five": dict(num_tasks=6),
    "q4_over_98": dict(accuracy_pct=98.5),
    "q4_95_to_98": dict(accuracy_pct=95),
    "q4_under_95": dict(accuracy_pct=94.9),
    "q5_edge": dict(deployment="edge", rapid_updates=True),
    "q5_rapid": dict(deployment="cloud", rapid_updates=True),
    "q5_cloud": dict(deployment="cloud"),
    "q5_on_prem": dict(deployment="on-prem"),
    "q6_sequential": dict(continual="sequential"),
    "q6_none": dict(continual="none"),
    "q6_critical": dict(continual="critical"),
}


def test_tree_cases_cover_every_branch(book):
    assert set(TREE_CASES) == {b.id for q in book.tree for b in q.branches}


@pytest.mark.parametrize("branch", sorted(TREE_CASES))
def test_tree_branch(branch):
    nodes = walk_tree(facts(**TREE_CASES[branch]))
    node = next(n for n in nodes if n.id == branch.split("_")[0])
    assert node.rule == branch
    assert sum(o.chosen for o in node.options) == 1
    assert all(n.chosen is not None for n in nodes), "every question has an option for every situation"


# ------------------------------------------------------------------------------------------ method rules
METHOD_CASES = {
    # "Critical to avoid forgetting: → Full fine-tuning"
    "m_critical_forgetting": (dict(continual="critical", budget_usd=100), "full"),
    # ">98% required: → Full fine-tuning" (even with a small budget: physics then arbitrates the cost)
    "m_accuracy_over_98": (dict(accuracy_pct=99, budget_usd=300), "full"),
    # "(Accuracy_requirement > 97%) AND (Budget > $10,000) AND (Single_task OR Task_very_different)"
    "m_full_if": (dict(accuracy_pct=97.5, budget_usd=20_000, num_tasks=4, domain="different"), "full"),
    # "| Edge device deployment | QLoRA | r=4-8, quantized |"
    "m_edge": (dict(deployment="edge"), "qlora"),
    # "| >100B model, limited hardware | QLoRA | r=8-16, 4-bit |"
    "m_huge_model": (dict(params_b=405, kind="datacenter", gpu_gib=80, num_gpus=4), "qlora"),
    # "(Budget < $5,000) OR (GPU_memory < 80GB) OR (Num_tasks > 3) OR (Need_fast_iteration)"
    "m_lora_if": (dict(budget_usd=4_999, kind="datacenter", gpu_gib=80), "lora"),
    # "LoRA is the default choice for most practitioners in 2024-2025."
    "m_default": (dict(budget_usd=50_000, kind="datacenter", gpu_gib=80, num_gpus=8), "lora"),
}


def test_method_cases_cover_every_rule(book):
    assert set(METHOD_CASES) == {r.id for r in book.method_rules}


@pytest.mark.parametrize("rule_id", sorted(METHOD_CASES))
def test_method_rule(rule_id):
    overrides, method = METHOD_CASES[rule_id]
    rule, step = choose_method(facts(**overrides))
    assert (rule.id, rule.method) == (rule_id, method)
    assert step.section == rule.section and step.rule == rule_id


def test_full_if_needs_all_three_conditions():
    # Same as m_full_if but 4 tasks and a close domain: the "Single_task OR Task_very_different" part fails.
    rule, _ = choose_method(facts(accuracy_pct=97.5, budget_usd=20_000, num_tasks=4, domain="close"))
    assert rule.method == "lora"


# ------------------------------------------------------------------------------------------ config rules
def _settings(method="lora", **overrides):
    return configure(facts(**overrides), method)


# rule id -> (method, overrides, check on (settings, steps))
CONFIG_CASES = {
    "c_rank_start": ("lora", {}, lambda s: s.rank == 16),  # "Start with r=16"; summarization keeps it (8-16)
    "c_rank_simple": ("lora", dict(complexity="simple"), lambda s: s.rank == 8 and s.rank_range == (4, 8)),
    "c_rank_summarization": ("lora", dict(complexity="summarization"), lambda s: s.rank_range == (8, 16)),
    "c_rank_reasoning": ("lora", dict(complexity="reasoning"), lambda s: s.rank == 16 and s.rank_range == (16, 32)),
    "c_rank_coding": ("lora", dict(complexity="coding"), lambda s: s.rank == 32 and s.rank_range == (32, 64)),
    "c_rank_domain_far": ("lora", dict(complexity="reasoning", domain="different"), lambda s: s.rank == 32),
    "c_rank_rapid": ("lora", dict(rapid_updates=True), lambda s: s.rank == 8),  # "Rapid A/B testing ... r=8"
    "c_rank_accuracy_high": ("lora", dict(accuracy_pct=96), lambda s: s.rank == 64),  # "95-98%: ... r=64+"
    "c_dora_accuracy": ("lora", dict(accuracy_pct=99), lambda s: s.values["dora"] and s.rank == 64),
    "c_rank_continual": ("lora", dict(continual="sequential"), lambda s: s.rank == 64),
    "c_rank_huge_qlora": ("qlora", dict(params_b=405, complexity="coding"), lambda s: s.rank == 16),
    "c_rank_edge": ("qlora", dict(deployment="edge"), lambda s: s.rank == 8),
    "c_rslora_high_rank": ("lora", dict(complexity="coding"), lambda s: s.values["rslora"]),
    "c_rslora_continual": ("qlora", dict(continual="sequential", deployment="edge"), lambda s: s.values["rslora"]),
    "c_alpha": ("lora", {}, lambda s: s.values["alpha_per_rank"] == 2),  # "alpha = 2*r"
    "c_dropout": ("lora", {}, lambda s: s.values["dropout"] == 0.05),
    "c_targets_minimum": ("lora", dict(complexity="simple"), lambda s: s.values["target_modules"] == "attention-qv"),
    "c_targets_attention": ("lora", {}, lambda s: s.values["target_modules"] == "attention"),
    "c_targets_all_linear": ("lora", dict(complexity="coding"), lambda s: s.values["target_modules"] == "all-linear"),
    "c_lr_full": ("full", {}, lambda s: s.values["learning_rate"] == 2e-5 and s.rank is None),
    "c_lr_full_forgetting": ("full", dict(continual="critical"), lambda s: s.values["learning_rate"] == 1e-5),
    # "LoRA: lr = 1e-4 to 3e-4 (10x higher!)"
    "c_lr_adapter": ("lora", {}, lambda s: s.values["learning_rate"] == 2e-4),
    "c_quantization": ("qlora", {}, lambda s: s.values["quantization"] == "nf4"),
    "c_batch": ("lora", {}, lambda s: (s.values["micro_batch_size"], s.values["gradient_accumulation_steps"]) == (4, 4)),
    "c_full_multi_gpu": ("full", dict(kind="datacenter", num_gpus=8),
                         lambda s: s.values["sharding"] == "zero3" and s.values["micro_batch_size"] == 1),
}


def test_config_cases_cover_every_rule(book):
    assert set(CONFIG_CASES) == {r.id for r in book.config_rules}


@pytest.mark.parametrize("rule_id", sorted(CONFIG_CASES))
def test_config_rule(rule_id):
    method, overrides, check = CONFIG_CASES[rule_id]
    settings, steps = _settings(method, **overrides)
    assert rule_id in [s.rule for s in steps]
    assert check(settings), settings


def test_learning_rate_of_lora_is_ten_times_full():
    # "lora_lr = full_finetuning_lr * 10"
    full, _ = _settings("full")
    lora, _ = _settings("lora")
    assert lora.values["learning_rate"] == pytest.approx(10 * full.values["learning_rate"])
    assert 1e-5 <= full.values["learning_rate"] <= 5e-5 and 1e-4 <= lora.values["learning_rate"] <= 3e-4


def test_full_has_no_adapter_settings():
    settings, steps = _settings("full", complexity="coding", continual="sequential")
    assert settings.rank is None and "rslora" not in settings.values
    assert not any(s.rule.startswith("c_rank") for s in steps)


# ------------------------------------------------------------------------------------------ warnings
WARNING_CASES = {
    "w_consider_prompting": ("lora", dict(examples=100)),
    "w_full_needs_data": ("full", dict(examples=5_000)),
    "w_lora_needs_data": ("lora", dict(examples=800, complexity="reasoning")),
    "w_rank_too_low": ("qlora", dict(deployment="edge", complexity="reasoning")),
    "w_rank_below_accuracy": ("qlora", dict(deployment="edge", accuracy_pct=96)),
    "w_intruder_dimensions": ("qlora", dict(deployment="edge", continual="sequential")),
    "w_adapter_accuracy_gap": ("lora", dict(accuracy_pct=99)),
    "w_full_storage": ("full", dict(num_tasks=3)),
    "w_full_forgetting": ("full", {}),
}


def test_warning_cases_cover_every_rule(book):
    assert set(WARNING_CASES) == {r.id for r in book.warnings}


@pytest.mark.parametrize("rule_id", sorted(WARNING_CASES))
def test_warning_rule(rule_id):
    method, overrides = WARNING_CASES[rule_id]
    f = facts(**overrides)
    settings, _ = configure(f, method)
    f.update(settings.values, rank=settings.rank or 0)
    fired = {w.rule: w for w in warnings_for(f, method)}
    assert rule_id in fired
    assert "{" not in fired[rule_id].message


def test_no_warning_for_a_sound_plan():
    f = facts()  # 10,000 examples, summarization, r=16, no continual learning
    settings, _ = configure(f, "lora")
    f.update(settings.values, rank=settings.rank)
    assert warnings_for(f, "lora") == []


# ------------------------------------------------------------------------------------------ matrix rows
MATRIX_CASES = {
    "mx_startup": dict(num_tasks=3),
    "mx_enterprise": dict(accuracy_pct=99),
    "mx_huge_model": dict(params_b=405),
    "mx_multilingual": dict(num_tasks=20, domain="different"),
    "mx_rapid": dict(rapid_updates=True),
    "mx_edge": dict(deployment="edge"),
}


def test_matrix_cases_cover_every_askable_row(book):
    assert set(MATRIX_CASES) == {r.id for r in book.matrix if r.when is not None}


@pytest.mark.parametrize("row_id", sorted(MATRIX_CASES))
def test_matrix_row(row_id):
    assert row_id in [r.id for r in matrix_rows(facts(**MATRIX_CASES[row_id]))]


@pytest.mark.parametrize(
    "row_id,method,overrides",
    [
        # Each askable row's own situation: the rules give the row's method, and a rank inside its range.
        ("mx_startup", "lora", dict(num_tasks=3)),
        ("mx_enterprise", "full", dict(accuracy_pct=99, budget_usd=50_000)),
        ("mx_huge_model", "qlora", dict(params_b=405)),
        ("mx_multilingual", "lora", dict(num_tasks=20, domain="different")),
        ("mx_rapid", "lora", dict(rapid_updates=True)),
        ("mx_edge", "qlora", dict(deployment="edge")),
    ],
)
def test_rules_agree_with_the_matrix_row(book, row_id, method, overrides):
    row = next(r for r in book.matrix if r.id == row_id)
    f = facts(**overrides)
    rule, _ = choose_method(f)
    assert rule.method == row.method == method
    settings, _ = configure(f, rule.method)
    if row.rank is not None:
        assert row.rank[0] <= settings.rank <= row.rank[1]


# ------------------------------------------------------------------------------------------ property (rules only)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    budget=st.floats(0, 1e6), tasks=st.integers(1, 100), accuracy=st.floats(1, 100), params_b=st.floats(0.1, 500),
    gpu_gib=st.sampled_from([16, 24, 48, 80, 141]), kind=st.sampled_from(["consumer", "datacenter"]),
    num_gpus=st.integers(1, 16), rent=st.booleans(), deployment=st.sampled_from(["edge", "cloud", "on-prem"]),
    rapid=st.booleans(), continual=st.sampled_from(["none", "sequential", "critical"]),
    complexity=st.sampled_from(["simple", "summarization", "reasoning", "coding"]),
    domain=st.sampled_from(["close", "different"]),
)
def test_rules_always_answer_within_the_seeds_ranges(budget, tasks, accuracy, params_b, gpu_gib, kind, num_gpus, rent,
                                                      deployment, rapid, continual, complexity, domain):
    f = facts(params_b=params_b, gpu_gib=gpu_gib, kind=kind, budget_usd=budget, num_tasks=tasks, accuracy_pct=accuracy,
              num_gpus=num_gpus, rent_in_cloud=rent, deployment=deployment, rapid_updates=rapid, continual=continual,
              complexity=complexity, domain=domain)
    assert all(n.chosen is not None for n in walk_tree(f))
    rule, _ = choose_method(f)
    for method in ("full", "lora", "qlora"):
        settings_, _ = configure(f, method)
        lr = settings_.values["learning_rate"]
        if method == "full":
            assert settings_.rank is None and 1e-5 <= lr <= 5e-5  # "Full Fine-Tuning: lr = 1e-5 to 5e-5"
        else:
            # the seed's ranks run from r=4 (simple, edge) to r=64 (coding, high accuracy, continual)
            assert 4 <= settings_.rank <= 64 and 1e-4 <= lr <= 3e-4  # "LoRA: lr = 1e-4 to 3e-4"
            assert settings_.values["alpha_per_rank"] == 2
            if settings_.rank >= 32 or continual != "none":
                assert settings_.values.get("rslora")
