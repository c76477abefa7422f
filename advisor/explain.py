"""The path to a recommendation in words: the budget and ladder steps as ``Reason``s, the conflicts between the
tree's answers and the method, the decision path as a tree, and the explicit 'nothing fits' answer."""

from __future__ import annotations

from advisor.answers import Answers
from advisor.labels import gib, label, usd
from advisor.ladder import SHARDED, Context, closest, request, run_spec
from advisor.result import Candidate, NoFit, NothingFits, Reason
from advisor.rules import RuleBook, TreeNode, TreeOption, matrix_rows


def matrix_reasons(facts: dict, book: RuleBook) -> list[Reason]:
    """The rows of the seed's Quick Selection Matrix that match the facts, each as a step of the path."""
    out = []
    for row in matrix_rows(facts, book):
        rank = "" if not row.rank else (f", r={row.rank[0]}" if row.rank[0] == row.rank[1]
                                        else f", r={row.rank[0]}-{row.rank[1]}")
        out.append(Reason(kind="matrix", question="Which row of the Quick Selection Matrix matches?",
                          answer=row.situation, rule=row.id, section=row.section, quote=row.quote,
                          effect=f"the matrix says {row.method}{rank}"))
    return out


def budget_reason(answers: Answers) -> Reason:
    tasks = f" x {answers.num_tasks} tasks" if answers.num_tasks > 1 else ""
    return Reason(
        kind="physics",
        question="How is the budget checked?",
        answer=f"budget {usd(answers.budget_usd)}",
        rule="budget",
        section="Real Cost Comparison",
        quote="1× RTX 4090 (24GB) - owned or $2/hour cloud",
        effect=(f"estimated cost = GPU-hours x the catalog's price per GPU-hour{tasks}; GPUs you own are priced "
                f"as if rented, as the seed's cost comparison does"),
    )


def ladder_reasons(book: RuleBook, tried: list[Candidate], chosen: Candidate | None) -> list[Reason]:
    rungs = {r.id: r for r in book.ladder}
    out = []
    for cand in tried:
        rung = rungs[cand.rung]
        req = cand.request
        out.append(Reason(
            kind="physics",
            question=f"Does {rung.label} fit {req['num_gpus']}x {req['gpu']} and the budget?",
            answer=cand.verdict,
            rule=rung.id,
            section=rung.section,
            quote=rung.quote,
            effect="chosen" if cand is chosen else ("rejected: " + ("over budget" if cand.fits and not cand.error
                                                                    else "does not fit" if not cand.error
                                                                    else "cannot be estimated")),
        ))
    return out


def conflicts(nodes: list[TreeNode], method_rule, method: str, wanted: str, tried: list[Candidate],
               answers: Answers, chosen: Candidate | None = None) -> tuple[list[Reason], list[str]]:
    """Questions of the tree that lean away from the final method, and physics overriding the rules."""
    reasons, warnings = [], []
    family = {"full": {"full"}, "lora": {"lora", "qlora"}, "qlora": {"lora", "qlora"}}
    for node in nodes:
        if node.strong and not (set(node.leans) & family[method]):
            text = (f"Conflict: {node.question} ({node.answer}: '{node.chosen}') leans to {' / '.join(node.leans)}, "
                    f"but {method} was chosen")
            if method == wanted:
                text += f" because rule {method_rule.id} ({method_rule.because}) comes first"
                if chosen is not None:
                    text += f"; the estimate backs it: {chosen.verdict}"
            else:
                text += " because the estimator's figures ruled out the methods above it"
            reasons.append(Reason(kind="conflict", question=node.question, answer=node.answer, rule=node.rule or "",
                                  section=node.section or "", quote="", effect=text))
            warnings.append(text + ".")
    if method != wanted:
        first = next((c for c in tried if c.method == wanted), None)
        why = first.verdict if first else f"{wanted} could not be estimated"
        trade = {
            ("full", "lora"): "an adapter instead of all weights: the seed puts LoRA at 95-99% of full fine-tuning "
                              "(usually < 1-3% lower), with less forgetting",
            ("full", "qlora"): "a 4-bit base with an adapter instead of all weights: lower peak accuracy than full "
                               "fine-tuning (the seed: LoRA 95-99% of full) and slower steps from dequantization",
            ("lora", "qlora"): "the base is stored in 4-bit NF4: less memory, slightly slower steps, a small "
                               "quality cost",
        }.get((wanted, method), "a lighter configuration")
        text = (f"Trade-off: the rules want {wanted} ({method_rule.because}), but {why}. Recommending {method}: "
                f"{trade}.")
        if wanted == "full" and answers.accuracy_pct > 98:
            text += (f" Your {answers.accuracy_pct:g}% target may not be met; the seed's way to close the gap is a "
                     f"higher rank (r=64-128) and DoRA, which this plan uses, or a larger budget/more GPUs for full "
                     f"fine-tuning.")
        reasons.append(Reason(kind="conflict", question="Do the estimator's figures allow the method the rules want?",
                              answer=why, rule="physics", section="Decision Framework", quote="", effect=text))
        warnings.append(text)
    return reasons, warnings


def decision_path(nodes: list[TreeNode], method_rule, book: RuleBook, tried: list[Candidate],
                   chosen: Candidate | None) -> list[TreeNode]:
    path = list(nodes)
    path.append(TreeNode(
        id="method",
        question="Which method do the seed's rules want?",
        answer=method_rule.because,
        options=[TreeOption(label=f"{r.method} ({r.id})", leans=[r.method], chosen=r is method_rule)
                 for r in book.method_rules],
        chosen=f"{method_rule.method} ({method_rule.id})",
        rule=method_rule.id, section=method_rule.section, leans=[method_rule.method], strong=True,
    ))
    labels = []
    for cand in tried:
        text = f"{label(cand)} on {cand.request['num_gpus']}x {cand.request['gpu']}"
        labels.append((text, cand is chosen, cand.method))
    path.append(TreeNode(
        id="physics",
        question="Does it fit the GPUs and the budget? (fallback ladder)",
        answer=chosen.verdict if chosen else "nothing fits",
        options=[TreeOption(label=lbl, leans=[m], chosen=c) for lbl, c, m in labels],
        chosen=next((lbl for lbl, c, _ in labels if c), None),
        rule=chosen.rung if chosen else None, leans=[chosen.method] if chosen else [],
    ))
    return path


def nothing_fits(ctx: Context, wanted: str, tried: list[Candidate], reasons: list[Reason]) -> NothingFits:
    """Build the explicit 'nothing fits' answer: the closest miss and what would make it fit."""
    near = closest(tried)
    needed: list[str] = []
    a = ctx.answers
    if near is not None and near.error is None and near.peak_bytes:
        if not near.fits:
            needed += _what_would_fit(ctx, near)
        if near.cost_usd is not None and near.cost_usd > a.budget_usd:
            needed.append(f"a budget of at least {usd(near.cost_usd)} (you gave {usd(a.budget_usd)}) for "
                          f"{near.method}" + (f" over {a.num_tasks} tasks" if a.num_tasks > 1 else ""))
    if a.examples * a.tokens_per_example * a.epochs > 0 and near and near.cost_usd and \
            near.cost_usd > a.budget_usd:
        needed.append("or fewer examples / epochs / tokens per example, which lowers the cost in proportion")
    where = "any catalog GPU (1-8)" if a.rent_in_cloud else f"{a.num_gpus}x {a.gpu}"
    message = (f"nothing fits: no rung of the fallback ladder (from {wanted} down to QLoRA with checkpointing, "
               f"micro-batch 1 and sharding) fits {where} within the {usd(a.budget_usd)} budget")
    if near is not None:
        message += f"\nclosest: {near.verdict}"
    if needed:
        message += "\nwhat would make it fit: " + "; ".join(needed)
    return NothingFits(message, NoFit(message=message, closest=near, needed=needed, tried=tried, reasons=reasons))


def _what_would_fit(ctx: Context, cand: Candidate) -> list[str]:
    """For a configuration that does not fit: more of the same GPU with ZeRO-3, or a bigger catalog GPU."""
    from estimator import estimate, min_gpus
    from estimator.catalog import get_gpu, list_gpus
    from estimator.errors import EstimatorError
    from estimator.request import EstimateRequest

    out = []
    req = EstimateRequest.model_validate(cand.request)
    try:
        n = min_gpus(EstimateRequest.model_validate(
            dict(cand.request, sharding=SHARDED, num_gpus=max(req.num_gpus, 2))))
    except EstimatorError:
        n = None
    gpu = get_gpu(req.gpu)
    if n and n > req.num_gpus:
        out.append(f"{n}x {gpu.name} with ZeRO-3 for {cand.method}")
    for other in list_gpus():
        if other.memory_bytes <= gpu.memory_bytes:
            continue
        try:  # the same run on the other GPU: its precision follows the GPU (bf16 or fp16)
            est = estimate(request(ctx, run_spec(ctx, cand.method, cand.settings, other, req.num_gpus), other))
        except EstimatorError:
            continue
        if est.fits:
            out.append(f"one {other.name} ({gib(other.memory_bytes)}) for {cand.method}: peak "
                       f"{gib(est.memory.peak_bytes)}")
            break
    return out
