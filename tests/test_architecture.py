"""The house rules of docs/architecture.md, checked on the source: imports point one way (no cycle between
modules, nothing imports the command line, ``labelstore`` needs neither torch nor DALI, ``pipelines`` no
training code), and the training loop and the run's state name no objective."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("fkd_dali", "pipelines", "labelstore")


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _imported(module: str, node: ast.AST) -> list[str]:
    """The names an import statement of ``module`` brings in, as absolute dotted names."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        package = module if MODULES[module].endswith("__init__.py") else module.rsplit(".", 1)[0]
        parts = package.split(".")
        target = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        target = node.module
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return subs if len(subs) == len(node.names) else [target, *subs]  # "from pkg import mod" needs mod only


def _own(name: str) -> str | None:
    """The module of ours that ``name`` is, or is inside of (None: a third-party module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports of our modules by module, third-party top-level packages by module); imports inside functions
    count too: a lazy import is still an arrow."""
    ours, theirs = {m: set() for m in MODULES}, {m: set() for m in MODULES}
    for m, path in MODULES.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(m, node):
                    own = _own(name)
                    if own and own != m:
                        ours[m].add(own)
                    elif not own:
                        theirs[m].add(name.split(".")[0])
    return ours, theirs


OURS, THEIRS = _graph()


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    assert {"fkd_dali.cli", "fkd_dali.loop", "labelstore.store", "pipelines.loader"} <= set(MODULES)
    assert "fkd_dali.trainer" in OURS["fkd_dali.train"] and "torch" in THEIRS["fkd_dali.loop"]


def test_no_import_cycle():
    assert _cycles(OURS) == []


def test_nothing_imports_the_command_line():
    users = sorted(m for m, deps in OURS.items() if "fkd_dali.cli" in deps and m != "fkd_dali.__main__")
    assert users == [], f"{users} import fkd_dali.cli: move what they need below it (fkd_dali.options)"


@pytest.mark.parametrize("package, forbidden", [
    ("labelstore", {"torch", "nvidia", "fkd_dali", "pipelines"}),
    ("pipelines", {"fkd_dali"}),
])
def test_lower_floors_do_not_reach_up(package, forbidden):
    bad = {m: sorted((THEIRS[m] | {d.split(".")[0] for d in OURS[m]}) & forbidden)
           for m in MODULES if m.split(".")[0] == package}
    assert {m: b for m, b in bad.items() if b} == {}


def test_the_loop_and_the_run_name_no_objective():
    """fkd_dali.loop and fkd_dali.trainer reach an objective through its methods only: no objective's name, no
    test of --labels, no import of an objective's module."""
    from fkd_dali import objectives
    names = set(objectives.BUILTIN)
    for module in ("fkd_dali.loop", "fkd_dali.trainer"):
        with open(MODULES[module]) as f:
            tree = ast.parse(f.read())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not strings & names, (module, strings & names)
        compared = {id(x) for c in ast.walk(tree) if isinstance(c, ast.Compare) for x in ast.walk(c)}
        labels = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and id(n) in compared
                  and n.attr in ("labels", "use_discriminator_loss")]
        assert labels == [], f"{module} compares the objective's option"
        assert not {d for d in OURS[module] if d.startswith("fkd_dali.objectives.")} - {"fkd_dali.objectives.base"}, \
            f"{module} imports an objective's module"
