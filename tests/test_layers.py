"""The layers, read from the code: every first-party module's imports (parsed with ``ast``, nothing imported), held
to the rules below. A failure prints each offending import as ``module (file:line) -> imported module``.

Every ``import`` statement counts, wherever it is: at the top, inside a function (a lazy import is still a
dependency), under ``if TYPE_CHECKING:``. The rules, bottom to top (README "Architecture" draws them):

- ``ftcore`` (errors, paths) imports nothing of ours; the shipped data (``ftadvisor_data``) is read through
  ``ftcore.paths.data_path`` (importlib.resources), never imported.
- ``estimator`` imports only ``ftcore``.
- ``runner`` imports ``ftcore`` and ``estimator``; inside it the units are ranked and an import goes to the same or
  a lower rank, and no two modules import each other, directly or around a loop:
  core (``errors``, ``exitcodes``, ``spec``, ``models``) < ``launch`` and ``estimate_request`` (what a spec turns
  into: processes, a portable bundle, an estimate request) < ``tools`` (after-run analysis of model files) <
  ``jobs`` (the run folder, registry, supervisor, manager, sweep) < ``train`` (recipe and worker) < the command
  modules (``cli``, ``adapters_cli``, ``data_cli``, ``export_cli``). So the sub-packages form no cycle.
- ``advisor`` imports ``ftcore``, ``estimator`` and, of ``runner``, only the spec level: the spec it recommends,
  the one spec -> estimate-request mapping, the runner's errors.
- ``ui`` (the Streamlit app) may import every package but ``ftadvisor``; nothing imports ``ui`` but ``ui`` itself,
  the entry scripts (the checkout's ``app.py``, ``ui/entry/app.py``) and ``ftadvisor.cli`` (``ftadvisor app``
  finds the installed app's folder through it).
- ``ftadvisor`` (the command line) is the top: nothing imports it.
- Below ``ui``, nothing imports Streamlit (packages return types; only pages draw them).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ftcore", "estimator", "advisor", "runner", "ui", "ftadvisor")
OURS = (*PACKAGES, "ftadvisor_data")
#: Entry scripts Streamlit runs (not importable modules), with the module name used for them here.
ENTRY_SCRIPTS = {"app": ROOT / "app.py"}

ALLOWED_PACKAGES = {
    "ftcore": set(),
    "estimator": {"ftcore"},
    "runner": {"ftcore", "estimator"},
    "advisor": {"ftcore", "estimator", "runner"},
    "ui": {"ftcore", "estimator", "advisor", "runner"},
    "ftadvisor": {"ftcore", "estimator", "advisor", "runner", "ui"},
    "app": {"ui"},
}
#: The runner modules the advisor may import: the spec level (no training, no processes).
ADVISOR_RUNNER = {"runner", "runner.spec", "runner.estimate_request", "runner.errors", "runner.exitcodes"}
#: Modules outside ``ui`` that may import it (besides the entry scripts).
UI_IMPORTERS = {"ftadvisor.cli"}
#: The runner's units, by rank (a unit is a sub-package or a top-level module); an import goes to rank <= own.
RUNNER_RANK = {
    "runner": 0, "runner.errors": 0, "runner.exitcodes": 0, "runner.spec": 0, "runner.models": 0,
    "runner.launch": 1, "runner.estimate_request": 1,
    "runner.tools": 2,
    "runner.jobs": 3,
    "runner.train": 4,
    "runner.cli": 5, "runner.adapters_cli": 5, "runner.data_cli": 5, "runner.export_cli": 5,
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. runner.jobs.manager
    target: str  # imported first-party module (the longest prefix that is a module of ours)
    where: str  # file:line

    def __str__(self) -> str:
        return f"{self.source} ({self.where}) -> {self.target}"


def _module_files() -> dict[str, Path]:
    files = dict(ENTRY_SCRIPTS)
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
    return files


MODULES = _module_files()


def _resolve(name: str) -> str:
    """The module an imported name lives in: ``runner.spec.RunSpec`` -> ``runner.spec``."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in MODULES:
            return ".".join(parts[:n])
    return name  # ftadvisor_data, or a first-party name that is not a module file


def _imports() -> list[Import]:
    found = []
    for source, path in MODULES.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = source.split(".") if is_package else source.split(".")[:-1]
                    package = package[:len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for name in names:
                if name.split(".")[0] in OURS:
                    target = _resolve(name)
                    if target != source:
                        found.append(Import(source, target, where))
    return found


IMPORTS = _imports()


def _package(module: str) -> str:
    return module.split(".")[0]


def _unit(module: str) -> str:
    """A runner module's unit: its sub-package (runner.jobs) or, at the top, itself (runner.spec)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _fail(bad, rule: str):
    if bad:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(sorted({str(b) for b in bad})))


def test_the_parse_sees_the_known_imports():
    # a few imports this file must see, or every rule below would pass on nothing
    pairs = {(i.source, i.target) for i in IMPORTS}
    assert ("runner.jobs.manager", "runner.jobs.registry") in pairs
    assert ("estimator.catalog", "ftcore.paths") in pairs and ("advisor.ladder", "runner.spec") in pairs
    assert ("app", "ui.app") in pairs
    assert len(MODULES) > 80 and len(IMPORTS) > 200


def test_packages_import_only_the_layers_below():
    bad = [i for i in IMPORTS if _package(i.target) != _package(i.source)
           and _package(i.target) not in ALLOWED_PACKAGES[_package(i.source)]]
    _fail(bad, "an import into a layer that is not below (ftcore < estimator < runner < advisor < ui < ftadvisor)")


def test_nothing_imports_the_shipped_data_package():
    _fail([i for i in IMPORTS if _package(i.target) == "ftadvisor_data"],
          "ftadvisor_data is read through ftcore.paths.data_path, not imported")


def test_advisor_imports_only_the_runner_spec_level():
    bad = [i for i in IMPORTS if _package(i.source) == "advisor" and _package(i.target) == "runner"
           and i.target not in ADVISOR_RUNNER]
    _fail(bad, f"advisor may import from runner only {sorted(ADVISOR_RUNNER)}")


def test_nothing_imports_ui_but_the_app_and_the_cli():
    bad = [i for i in IMPORTS if _package(i.target) == "ui" and _package(i.source) not in ("ui", "app")
           and i.source not in UI_IMPORTERS]
    _fail(bad, f"only ui itself, the entry scripts and {sorted(UI_IMPORTERS)} import ui")


def test_nothing_imports_the_command_line_package():
    _fail([i for i in IMPORTS if _package(i.target) == "ftadvisor" and _package(i.source) != "ftadvisor"],
          "ftadvisor (the command line) is the top: nothing imports it")


def test_packages_below_ui_do_not_import_streamlit():
    bad = []
    for source, path in MODULES.items():
        if _package(source) in ("ui", "app", "ftadvisor"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{source} ({path.relative_to(ROOT)}:{node.lineno}) -> {n}" for n in names
                    if n.split(".")[0] == "streamlit"]
    _fail(bad, "packages return types; only the ui layer imports streamlit")


def test_every_runner_module_has_a_rank():
    missing = sorted({_unit(m) for m in MODULES if _package(m) == "runner"} - set(RUNNER_RANK))
    assert not missing, f"give these runner units a rank in RUNNER_RANK (and the README diagram): {missing}"


def test_runner_imports_go_down_the_ranks():
    bad = [i for i in IMPORTS if _package(i.source) == _package(i.target) == "runner"
           and RUNNER_RANK[_unit(i.target)] > RUNNER_RANK[_unit(i.source)]]
    _fail(bad, "a runner import up the ranks (core < launch, estimate_request < tools < jobs < train < commands)")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_loop():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


#: Cycles known when this test was written, to be broken by whoever owns the package (strict: a fixed one fails
#: here until its mark is removed).
KNOWN_CYCLES: dict[str, str] = {}  # package -> why its cycle is accepted (none today)


@pytest.mark.parametrize("package", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_CYCLES[p])) if p in KNOWN_CYCLES else p
    for p in PACKAGES])
def test_no_import_cycle_between_modules(package):
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        if _package(i.source) == _package(i.target) == package and i.target != package:
            edges.setdefault(i.source, set()).add(i.target)
    cycles = _cycles(edges)
    shown = ["  " + " <-> ".join(c) + "\n    " + "\n    ".join(
        sorted({str(i) for i in IMPORTS if i.source in c and i.target in c})) for c in cycles]
    assert not cycles, f"import cycles in {package} (package __init__ imports aside):\n" + "\n".join(shown)


def test_no_import_cycle_between_runner_sub_packages():
    subs = {"runner.train", "runner.jobs", "runner.launch", "runner.tools"}
    edges: dict[str, set[str]] = {}
    for i in IMPORTS:
        a, b = _unit(i.source), _unit(i.target)
        if a != b and a in subs and b in subs:
            edges.setdefault(a, set()).add(b)
    cycles = _cycles(edges)
    shown = sorted({str(i) for i in IMPORTS if any(_unit(i.source) in c and _unit(i.target) in c
                                             and _unit(i.source) != _unit(i.target) for c in cycles)})
    assert not cycles, "runner sub-packages import each other:\n  " + "\n  ".join(shown)


def test_the_command_line_dispatches_to_each_package_cli_module():
    """``ftadvisor.cli`` imports its command modules by name (importlib), which the parse above cannot see: each is
    a real module here and the ``cli`` module of a package below the command line."""
    from ftadvisor.cli import COMMAND_MODULES

    missing = [m for m in COMMAND_MODULES if m not in MODULES]
    assert not missing, f"COMMAND_MODULES names modules that do not exist: {missing}"
    assert all(_package(m) in ALLOWED_PACKAGES["ftadvisor"] and m.rsplit(".", 1)[-1].endswith("cli")
               for m in COMMAND_MODULES), COMMAND_MODULES
