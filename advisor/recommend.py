"""Answers -> Recommendation: the seed's rules pick a method and its settings, the estimator's physics checks them.

Flow (each step recorded as a ``Reason``):
1. ``parse_answers``: validate, including the GPU and the model against the catalogs.
2. ``walk_tree``: Q1..Q6 of the seed's decision tree; ``choose_method``: the method the rules want.
3. ``configure``: rank, alpha, targets, learning rate, batch... for every method.
4. Physics (``advisor.ladder``): each candidate is the ``RunSpec`` it would launch, estimated through the one
   spec -> request mapping (``runner.estimate_request``), so the figure shown is the figure of the run handed
   over; a candidate whose peak memory does not fit the GPUs, or whose cost (all tasks) exceeds the budget, is
   rejected with the figure. The fallback ladder is walked from the wanted method: full -> LoRA -> QLoRA ->
   + gradient checkpointing -> + micro-batch 1 (same effective batch) -> + more GPUs sharded with ZeRO-3. The
   first rung that fits is the recommendation; ``advisor.alternatives`` shows the other methods beside it.
5. If no rung fits, ``NothingFits`` is raised (never a plan that does not fit), with the closest option and
   what it would need (``advisor.explain``, which also words the conflicts and the decision path).
The result types are in ``advisor.result``.
"""

from __future__ import annotations

from typing import Any

from advisor.alternatives import alternatives
from advisor.answers import Answers, parse_answers
from advisor.explain import budget_reason, conflicts, decision_path, ladder_reasons, matrix_reasons, nothing_fits
from advisor.facts import make_facts
from advisor.ladder import LADDER_METHODS, Context, walk_ladder
from advisor.result import Reason, Recommendation
from advisor.rules import (
    Settings,
    Step,
    choose_method,
    configure,
    load_rules,
    tree_steps,
    walk_tree,
    warnings_for,
)


def recommend(answers: Answers | dict[str, Any]) -> Recommendation:
    """The recommendation for these answers; raises ``AdvisorError`` for bad answers, ``NothingFits`` when no
    configuration fits the GPUs and the budget."""
    from estimator.catalog import get_gpu, resolve_model

    answers = parse_answers(answers)
    book = load_rules()
    entry = resolve_model(answers.model)
    gpu = None if answers.rent_in_cloud else get_gpu(answers.gpu)
    facts = make_facts(
        answers,
        model_params=model_total_params(entry),
        gpu_memory_bytes=gpu.memory_bytes if gpu else None,
        gpu_kind=gpu.kind if gpu else None,
    )
    warnings: list[str] = []
    reasons: list[Reason] = []

    seq_len = answers.tokens_per_example
    max_pos = _max_positions(entry.config)
    if max_pos and seq_len > max_pos:
        warnings.append(f"tokens_per_example {seq_len:,} is longer than {entry.display_name}'s context "
                        f"({max_pos:,} positions): sequences are truncated to {max_pos:,} tokens")
        seq_len = max_pos

    # 1. the seed's decision tree and the method the rules want
    nodes = walk_tree(facts, book)
    reasons += [Reason(kind="tree", **s.model_dump()) for s in tree_steps(nodes, book)]
    method_rule, method_step = choose_method(facts, book)
    reasons.append(Reason(kind="method", **method_step.model_dump()))
    wanted = method_rule.method
    reasons += matrix_reasons(facts, book)

    # 2. settings per method
    settings: dict[str, Settings] = {}
    config_steps: dict[str, list[Step]] = {}
    for m in LADDER_METHODS:
        settings[m], config_steps[m] = configure(facts, m, book)
    ctx = Context(answers=answers, book=book, facts=facts, settings=settings, seq_len=seq_len, gpu=gpu)

    # 3. physics: walk the ladder from the wanted method
    chosen, est, tried = walk_ladder(ctx, wanted)
    physics = [budget_reason(answers)] + ladder_reasons(book, tried, chosen)
    if chosen is None:
        raise nothing_fits(ctx, wanted, tried, reasons + physics)
    method = chosen.method
    s = chosen.settings
    reasons += [Reason(kind="config", **st.model_dump()) for st in config_steps[method]]
    reasons += physics

    # 4. warnings: rule warnings on the final configuration, conflicts, physics trade-offs
    final_facts = {**facts, **settings[method].values, "rank": s["rank"] or 0,
                   "target_modules": s["target_modules"] or ""}
    warnings += [w.message for w in warnings_for(final_facts, method, book)]
    conflict_reasons, conflict_warnings = conflicts(nodes, method_rule, method, wanted, tried, answers, chosen)
    reasons += conflict_reasons
    warnings += conflict_warnings
    if gpu is not None and not gpu.bf16_support:
        warnings.append(f"The {gpu.name} has no bf16: the run uses fp16 mixed precision (seed: 'fp16=True,  # For "
                        f"older GPUs'), which can overflow; watch for NaN losses.")

    from estimator import storage_for_tasks

    storage = storage_for_tasks(est, answers.num_tasks)
    req = chosen.request
    from runner.spec import RunSpec

    spec = RunSpec.model_validate(chosen.spec)  # the settings shown are read back from the run handed over
    adapter = method != "full"

    return Recommendation(
        model=spec.model,
        method=spec.method,
        rank=spec.peft.r if adapter else None,
        alpha=spec.peft.alpha if adapter else None,
        dropout=spec.peft.dropout if adapter else None,
        target_modules=spec.peft.target_modules if adapter else None,
        rslora=spec.peft.use_rslora,
        dora=spec.peft.use_dora,
        quantization=spec.quantization,
        optimizer=spec.optimizer,
        learning_rate=spec.learning_rate,
        epochs=spec.epochs,
        micro_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        gradient_checkpointing=spec.gradient_checkpointing,
        seq_len=spec.seq_len,
        dtype=spec.precision,
        sharding=req["sharding"],
        num_gpus=spec.distribution.world_size,
        gpu=req["gpu"],
        cost_usd=chosen.cost_usd,
        estimate=est.to_json(),  # nested as the CLI prints it: ["memory"]["peak_bytes"], ["gpu"], ...
        storage=storage,
        request=req,
        run_spec=chosen.spec,
        reasons=reasons,
        alternatives=alternatives(ctx, method, wanted, tried, chosen),
        warnings=warnings,
        decision_path=decision_path(nodes, method_rule, book, tried, chosen),
        answers=answers,
    )


def model_total_params(entry) -> int:
    """Total parameters (count): the catalog's published figure, else counted on the meta model."""
    if entry.published_params:
        return int(entry.published_params)
    from estimator.params import build_meta_model, count_parameters

    return count_parameters(build_meta_model(entry.config)).total


def _max_positions(config: dict) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return None
