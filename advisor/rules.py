"""The seed article's decision rules as data (``data/rules.yaml``) and a small engine that evaluates them.

Conditions are written in a tiny expression language, e.g. ``accuracy_pct > 97 and (num_tasks == 1 or
domain == 'different')``. They are parsed once with :mod:`ast` and only comparisons, ``and``/``or``/``not``,
names of known facts, constants and lists are accepted: nothing is ever ``eval``-ed.

Every rule cites the seed section (a heading of the seed article) it comes from and a short quote of it;
``tests/test_advisor_rules.py`` checks both against the seed text.

The engine is pure: it takes a dict of facts (the answers plus a few derived figures) and returns what the
rules say, with one :class:`Step` per rule that fired (question, answer, rule id, seed section, effect).
"""

from __future__ import annotations

import ast
import functools
import operator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from advisor.errors import AdvisorError
from ftcore.paths import data_path

RULES_PATH = data_path("rules.yaml")
MethodName = Literal["full", "lora", "qlora"]

# Facts a condition may name besides the Answers fields. Derived by advisor.facts.make_facts.
DERIVED_FACTS = {
    "model_params_b": "model size in billions of parameters (from the estimator's meta model)",
    "gpu_memory_gib": "memory of one GPU in GiB (catalog); 0 when renting",
    "total_gpu_memory_gib": "memory of all GPUs at hand in GiB; 0 when renting",
    "gpu_class": "consumer | single-datacenter | multi-datacenter | cluster | rent",
    "method": "the candidate method being configured: full | lora | qlora",
    "rank": "the LoRA rank chosen so far (0 for full fine-tuning)",
    "target_modules": "the target preset chosen so far",
}


class RuleFileError(AdvisorError):
    """The rule file itself is malformed (a bug in data/rules.yaml, not in the user's answers)."""


# --------------------------------------------------------------------------------------------------------
# The condition language
# --------------------------------------------------------------------------------------------------------
_COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


class Condition:
    """A parsed, validated condition. ``Condition("budget_usd < 1000").holds({"budget_usd": 300}) -> True``."""

    def __init__(self, text: str, known_names: set[str] | None = None):
        self.text = text
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise RuleFileError(f"condition {text!r} is not valid: {exc.msg}") from None
        self.names: set[str] = set()
        self._check(tree.body)
        unknown = self.names - known_names if known_names is not None else set()
        if unknown:
            raise RuleFileError(
                f"condition {text!r} names unknown facts {sorted(unknown)}; known: {sorted(known_names)}"
            )
        self._tree = tree.body

    def _check(self, node) -> None:
        if isinstance(node, ast.BoolOp) and isinstance(node.op, (ast.And, ast.Or)):
            for value in node.values:
                self._check(value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self._check(node.operand)
        elif isinstance(node, ast.Compare):
            if not all(type(op) in _COMPARE for op in node.ops):
                raise RuleFileError(f"condition {self.text!r}: only < <= > >= == != in, not in are allowed")
            for part in [node.left, *node.comparators]:
                self._check(part)
        elif isinstance(node, ast.Name):
            self.names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            pass
        elif isinstance(node, (ast.List, ast.Tuple)):
            for elt in node.elts:
                if not (isinstance(elt, ast.Constant) and isinstance(elt.value, (int, float, str))):
                    raise RuleFileError(f"condition {self.text!r}: lists may hold constants only")
        else:
            raise RuleFileError(f"condition {self.text!r}: {type(node).__name__} is not allowed")

    def holds(self, facts: dict[str, Any]) -> bool:
        return bool(self._eval(self._tree, facts))

    def _eval(self, node, facts):
        if isinstance(node, ast.BoolOp):
            if isinstance(node.op, ast.And):
                return all(self._eval(v, facts) for v in node.values)
            return any(self._eval(v, facts) for v in node.values)
        if isinstance(node, ast.UnaryOp):
            return not self._eval(node.operand, facts)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, facts)
            for op, right_node in zip(node.ops, node.comparators):
                right = self._eval(right_node, facts)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Name):
            if node.id not in facts:
                raise RuleFileError(f"condition {self.text!r} needs fact {node.id!r}, which was not given")
            return facts[node.id]
        if isinstance(node, ast.Constant):
            return node.value
        return [elt.value for elt in node.elts]  # List / Tuple, checked in _check

    def __repr__(self) -> str:
        return f"Condition({self.text!r})"


# --------------------------------------------------------------------------------------------------------
# The rule file schema
# --------------------------------------------------------------------------------------------------------
class _Cited(BaseModel):
    """Every rule says where in the seed it comes from: a heading (``section``) and a short ``quote``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    section: str = Field(description="a heading of the seed article, without the leading #")
    quote: str = Field(description="a short passage of the seed, verbatim (whitespace may differ)")


class Branch(_Cited):
    label: str = Field(description="the option as the seed words it")
    when: str = Field(description="condition on the facts")
    leans: list[MethodName] = Field(description="methods this option points to")
    strong: bool = Field(True, description="a clear preference: a different final method is a conflict to report")


class Question(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    question: str
    answer: str = Field(description="which answer field(s) the question reads, for display")
    branches: list[Branch]


class MethodRule(_Cited):
    when: str
    method: MethodName
    because: str = Field(description="one sentence: why this rule picks this method")


class RankOp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    range: tuple[int, int] | None = Field(None, description="set the allowed range and clamp the rank into it")
    top: bool = Field(False, description="move the rank to the top of the current range")
    min: int | None = None
    max: int | None = None
    set: int | None = None


class ConfigRule(_Cited):
    when: str = "True"
    methods: list[MethodName] = Field(default_factory=lambda: ["full", "lora", "qlora"])
    rank: RankOp | None = None
    set: dict[str, Any] = Field(default_factory=dict)
    because: str


class WarningRule(_Cited):
    when: str
    methods: list[MethodName] = Field(default_factory=lambda: ["full", "lora", "qlora"])
    message: str = Field(description="shown to the user; {name} is replaced by the fact of that name")


class MatrixRow(_Cited):
    situation: str
    method: MethodName
    rank: tuple[int, int] | None = None
    when: str | None = Field(None, description="null when the questionnaire cannot tell (shown, never matched)")


class LadderRung(_Cited):
    label: str


class RuleBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: str = Field(description="file name of the seed article under shared/seed")
    config_keys: list[str] = Field(description="settings a config rule may set")
    tree: list[Question]
    method_rules: list[MethodRule]
    config_rules: list[ConfigRule]
    warnings: list[WarningRule]
    matrix: list[MatrixRow]
    ladder: list[LadderRung] = Field(description="the fallback rungs, in order")

    @field_validator("method_rules")
    @classmethod
    def _has_default(cls, rules):
        if not rules or rules[-1].when.strip() != "True":
            raise ValueError("the last method rule must be the default (when: 'True')")
        return rules

    def all_cited(self) -> list[_Cited]:
        out: list[_Cited] = [b for q in self.tree for b in q.branches]
        out += self.method_rules + self.config_rules + self.warnings + self.matrix + self.ladder
        return out


def known_names() -> set[str]:
    from advisor.answers import Answers

    return set(Answers.model_fields) | set(DERIVED_FACTS)


@functools.lru_cache(maxsize=4)
def load_rules(path: str | Path = RULES_PATH) -> RuleBook:
    """Read and validate the rule file; every condition is parsed (unknown names are an error)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RuleFileError(f"rule file {path}: cannot read it ({exc})") from None
    book = RuleBook.model_validate(data)
    names = known_names()
    ids: set[str] = set()
    for rule in book.all_cited():
        if rule.id in ids:
            raise RuleFileError(f"rule file {path}: id {rule.id!r} is used twice")
        ids.add(rule.id)
        when = getattr(rule, "when", None)
        if when is not None:
            Condition(when, names)
    for rule in book.config_rules:
        unknown = set(rule.set) - set(book.config_keys)
        if unknown:
            raise RuleFileError(f"rule {rule.id}: sets unknown settings {sorted(unknown)}")
    return book


@functools.lru_cache(maxsize=512)
def _condition(text: str) -> Condition:
    return Condition(text, known_names())


def holds(text: str, facts: dict[str, Any]) -> bool:
    return _condition(text).holds(facts)


# --------------------------------------------------------------------------------------------------------
# What the engine returns
# --------------------------------------------------------------------------------------------------------
class Step(BaseModel):
    """One rule that fired: the question it answers, the user's answer, the rule and its seed section."""

    question: str
    answer: str
    rule: str = Field(description="rule id in data/rules.yaml")
    section: str = Field(description="seed heading the rule comes from")
    quote: str = Field(description="the seed's words")
    effect: str = Field(description="what the rule did")


class TreeOption(BaseModel):
    label: str
    leans: list[str]
    chosen: bool


class TreeNode(BaseModel):
    """One question of the seed's decision tree, as the app draws it: options, the one taken highlighted."""

    id: str
    question: str
    answer: str
    options: list[TreeOption]
    chosen: str | None = Field(description="label of the option taken (None: no option applies)")
    rule: str | None = None
    section: str | None = None
    leans: list[str] = Field(default_factory=list)
    strong: bool = False


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{int(value):,}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def answer_text(names: str, facts: dict[str, Any]) -> str:
    """``"budget_usd"`` -> ``"budget_usd = 300"``; several comma-separated names are joined."""
    parts = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        parts.append(f"{name} = {_fmt(facts.get(name))}")
    return ", ".join(parts)


def walk_tree(facts: dict[str, Any], book: RuleBook | None = None) -> list[TreeNode]:
    """Q1..Q6 of the seed's decision tree: for each question the first branch whose condition holds."""
    book = book or load_rules()
    nodes = []
    for q in book.tree:
        taken = next((b for b in q.branches if holds(b.when, facts)), None)
        nodes.append(
            TreeNode(
                id=q.id,
                question=q.question,
                answer=answer_text(q.answer, facts),
                options=[TreeOption(label=b.label, leans=b.leans, chosen=b is taken) for b in q.branches],
                chosen=taken.label if taken else None,
                rule=taken.id if taken else None,
                section=taken.section if taken else None,
                leans=taken.leans if taken else [],
                strong=taken.strong if taken else False,
            )
        )
    return nodes


def tree_steps(nodes: list[TreeNode], book: RuleBook | None = None) -> list[Step]:
    book = book or load_rules()
    by_id = {b.id: b for q in book.tree for b in q.branches}
    steps = []
    for node in nodes:
        if node.rule is None:
            continue
        branch = by_id[node.rule]
        steps.append(
            Step(
                question=node.question,
                answer=node.answer,
                rule=branch.id,
                section=branch.section,
                quote=branch.quote,
                effect=f"{branch.label}: leans to {' / '.join(branch.leans)}",
            )
        )
    return steps


def choose_method(facts: dict[str, Any], book: RuleBook | None = None) -> tuple[MethodRule, Step]:
    """The first method rule whose condition holds (the file ends with the default rule)."""
    book = book or load_rules()
    for rule in book.method_rules:
        if holds(rule.when, facts):
            return rule, Step(
                question="Which method do the seed's rules pick?",
                answer=rule.when if rule.when.strip() != "True" else "no specific rule applies",
                rule=rule.id,
                section=rule.section,
                quote=rule.quote,
                effect=f"{rule.method}: {rule.because}",
            )
    raise RuleFileError("no method rule applies; the rule file must end with a default rule")  # pragma: no cover


class Settings(BaseModel):
    """What the config rules produced for one method. Keys beyond rank come from ``config_keys``."""

    method: MethodName
    rank: int | None
    rank_range: tuple[int, int] | None
    values: dict[str, Any]


def configure(facts: dict[str, Any], method: str, book: RuleBook | None = None) -> tuple[Settings, list[Step]]:
    """Apply the config rules in file order for ``method``; later rules refine earlier ones."""
    book = book or load_rules()
    facts = dict(facts, method=method)
    rank: int | None = None if method == "full" else 0
    lo_hi: tuple[int, int] | None = None
    values: dict[str, Any] = {}
    steps: list[Step] = []
    for rule in book.config_rules:
        if method not in rule.methods:
            continue
        facts.update(values, rank=rank or 0)
        if not holds(rule.when, facts):
            continue
        effects = []
        if rule.rank is not None and rank is not None:
            op = rule.rank
            before = rank
            if op.set is not None:
                rank = op.set
            if op.range is not None:
                lo_hi = op.range
                rank = min(max(rank, op.range[0]), op.range[1])
            if op.top and lo_hi is not None:
                rank = lo_hi[1]
            if op.min is not None:
                rank = max(rank, op.min)
            if op.max is not None:
                rank = min(rank, op.max)
            if not before:
                effects.append(f"rank = {rank}")
            elif before != rank:
                effects.append(f"rank {before} -> {rank}")
            else:
                effects.append(f"rank stays {rank}")
            if op.range is not None:
                effects[-1] += f" (range r={op.range[0]}-{op.range[1]})"
        for key, value in rule.set.items():
            values[key] = value
            effects.append(f"{key} = {value}")
        if not effects:
            continue
        steps.append(
            Step(
                question=f"{method} settings",
                answer=rule.when if rule.when.strip() != "True" else "always",
                rule=rule.id,
                section=rule.section,
                quote=rule.quote,
                effect="; ".join(effects) + f" ({rule.because})",
            )
        )
    return Settings(method=method, rank=rank, rank_range=lo_hi, values=values), steps


class Fired(BaseModel):
    rule: str
    section: str
    message: str


def warnings_for(facts: dict[str, Any], method: str, book: RuleBook | None = None) -> list[Fired]:
    """The warning rules that hold for the final configuration (facts include method, rank, settings)."""
    book = book or load_rules()
    facts = dict(facts, method=method)
    out = []
    for rule in book.warnings:
        if method in rule.methods and holds(rule.when, facts):
            shown = {k: _fmt(v) for k, v in facts.items()}
            out.append(Fired(rule=rule.id, section=rule.section, message=rule.message.format_map(shown)))
    return out


def matrix_rows(facts: dict[str, Any], book: RuleBook | None = None) -> list[MatrixRow]:
    """Rows of the seed's Quick Selection Matrix whose situation matches the answers."""
    book = book or load_rules()
    return [row for row in book.matrix if row.when is not None and holds(row.when, facts)]
