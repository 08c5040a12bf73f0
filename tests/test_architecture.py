"""The package's import graph is a DAG: no module of icl_conml imports, directly or through
others, a module that imports it back.

Every ``import`` / ``from ... import`` counts, at module level and inside functions alike (a
lazy import is still a dependency, only a hidden one); imports under ``if TYPE_CHECKING:`` do
not (they never run). Importing ``a.b.c`` also runs the ``__init__`` of package ``a.b``: that
is an edge too, unless ``a.b`` encloses the importing module (it is then already loaded).

No circle is allowed (the last one, ``eval_sets`` <-> ``evaluation``, went when the OOD shifts
and ``sample_prompts`` moved into ``data.py``). Check by hand: ``python tests/test_architecture.py``
prints every module's imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "icl_conml"


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package (``__init__`` = the package)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(tree: ast.Module, module: str, is_package: bool) -> list[str]:
    """Every dotted name an import statement of ``tree`` asks for (outside TYPE_CHECKING blocks)."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            else:
                target = node.module or ""
            # ``from a import b``: ``a.b`` when b is a module, else a name defined in ``a``.
            names.extend(f"{target}.{alias.name}" for alias in node.names)
            names.append(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports (see the module docstring for what counts)."""
    modules = module_files(package)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for name in _imported_names(ast.parse(path.read_text()), module, is_package):
            if name not in modules:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # the module and each package on the way to it
                target = ".".join(parts[:i])
                encloses = module == target or module.startswith(target + ".")
                if target in modules and not encloses:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest import chain around ``component`` (breadth first), for the failure message."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for other in sorted(graph[node] & members):
            if other == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(previous[chain[-1]])
                return [start, *chain[::-1][1:], start]
            if other not in previous:
                previous[other] = node
                queue.append(other)
    return component


def test_no_import_cycles_among_icl_conml_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(a_cycle(graph, c)) for c in found)


def test_the_hub_card_lora_model_and_trainer_modules_are_in_no_circle():
    """The circle this test was written for: modeling <-> lora <-> hub (ICLModel.from_pretrained merged
    LoRA runs through a lazy import of lora, which imported hub for the card, which imported both)."""
    graph = import_graph()
    ours = {f"icl_conml.{name}" for name in ("modeling", "lora", "hub", "model_card", "trainer", "version")}
    assert all(not ours & set(c) for c in cycles(graph))
    assert "icl_conml.lora" not in graph["icl_conml.modeling"]  # LoRA loading stays in lora.py
    assert "icl_conml.evaluation" not in graph["icl_conml.model_card"]  # lora.merge writes cards


def test_prompts_and_eval_sets_sit_below_the_evaluation():
    """data.py owns every prompt (the OOD shifts and ``sample_prompts`` too): eval_sets builds sets
    from data alone, and the evaluation reads them back with eval_sets, one way."""
    graph = import_graph()
    evaluation = {name for name in graph if name.split(".")[:2] == ["icl_conml", "evaluation"]}
    assert not evaluation & graph["icl_conml.data"] and "icl_conml.eval_sets" not in graph["icl_conml.data"]
    assert not evaluation & graph["icl_conml.eval_sets"] and "icl_conml.data" in graph["icl_conml.eval_sets"]
    assert "icl_conml.eval_sets" in graph["icl_conml.evaluation.loading"]


def test_the_run_infrastructure_imports_none_of_the_learning_code():
    """``runs/`` (lock, guard, record, checkpoints, resume, ...) is about a run's folder: it reads the
    recipe's sections and the error convention, never the model, trainer, data or ConML modules."""
    graph = import_graph()
    runs = {name for name in graph if name.split(".")[:2] == ["icl_conml", "runs"]}
    assert {"icl_conml.runs", "icl_conml.runs.guard", "icl_conml.runs.resume"} <= runs
    below = runs | {"icl_conml.arguments", "icl_conml.distributed", "icl_conml.errors"}
    assert {name: graph[name] - below for name in runs if graph[name] - below} == {}


def test_the_checker_sees_cycles_lazy_imports_and_package_inits(tmp_path):
    """The graph above would report the circles this package used to have."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from .b import B\nA = 1\n")
    (package / "b.py").write_text(
        "def load():\n    from .a import A  # lazy: still an edge\n    return A\nB = 2\n"
    )
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\nfrom .sub.leaf import L\n"
    )
    (package / "d.py").write_text("from . import c\n")
    (package / "sub" / "__init__.py").write_text("from .user import U\n")
    (package / "sub" / "leaf.py").write_text("L = 0\n")
    (package / "sub" / "user.py").write_text("from ..c import L\nU = 1\n")
    graph = import_graph(package)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.d"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.leaf"}  # the package's __init__ runs first
    assert cycles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub", "pkg.sub.user"]]


if __name__ == "__main__":
    for module, imported in sorted(import_graph().items()):
        print(f"{module} -> {', '.join(sorted(imported)) or '-'}")
