"""The package's import graph has no cycle, counting imports inside functions too.

A cycle hidden by a function-level import still ties two modules together
(each needs the other to be importable first); the output layer in
particular must never import an experiment.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "causal_ie"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in package.rglob("*.py")}


def imported(path: Path, known: dict[str, Path], root: Path = ROOT) -> set[str]:
    """The causal_ie modules ``path`` imports anywhere in its body (functions and
    ``if TYPE_CHECKING`` blocks included): ``from a.b import c`` counts as ``a.b.c``
    when that is a module, else as ``a.b``."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return {name for name in found if name in known and name != this}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imported(path, known, package.parent) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub.c import C\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b  # hidden in a function\n    return b\n")
    (pkg / "b.py").write_text("import pkg.a\nfrom . import d\n")
    (pkg / "d.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from pkg.sub import helper  # not a module: the package\nC = 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a", "pkg.d"}
    assert sorted(map(sorted, cycles(graph))) == [["pkg.a", "pkg.b"], ["pkg.sub", "pkg.sub.c"]]
    (pkg / "a.py").write_text("")
    (pkg / "sub" / "c.py").write_text("C = 1\n")
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "causal_ie.outputs.report" in graph and graph["causal_ie.report"]  # the walk sees the package
    assert cycles(graph) == []


def test_the_output_layer_imports_no_experiment():
    graph = import_graph()
    allowed = ("causal_ie.outputs", "causal_ie.io")
    for name, targets in graph.items():
        if name.startswith("causal_ie.outputs"):
            assert all(t.startswith(allowed) for t in targets), (name, sorted(targets))


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph collapsed to causal_ie's sub-packages and top-level modules
    (``causal_ie.lightning.resume`` -> ``causal_ie.lightning``), edges inside one left out."""
    def unit(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = {}
    for name, targets in graph.items():
        out.setdefault(unit(name), set()).update(unit(t) for t in targets if unit(t) != unit(name))
    for targets in list(out.values()):
        for t in targets:
            out.setdefault(t, set())
    return out


def test_the_packages_form_a_dag():
    """A cycle between packages hides in a module graph without one (runs -> lightning.resume,
    lightning.evaluation -> explain, explain.task -> runs): the packages are checked too."""
    packages = package_graph(import_graph())
    assert "causal_ie.lightning" in packages and "causal_ie.runs" in packages
    assert cycles(packages) == []
    assert cycles(package_graph({"p.a.x": {"p.b.y"}, "p.b.y": set(), "p.b.z": {"p.a.w"}, "p.a.w": set()})) == [["p.a", "p.b"]]
