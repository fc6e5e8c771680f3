"""The shape of the code, checked from its source: no import circle, and only the registry and
the stage modules know stages by name (everything else asks the registry)."""

from __future__ import annotations

import ast
from pathlib import Path

import llmctl
from llmctl.stages import STAGES

PACKAGE = Path(llmctl.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never run."""
    return {id(n) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}


def _known(name: str) -> str | None:
    """The llmctl module ``name`` is, or is inside (``llmctl.a.b.func`` -> ``llmctl.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the llmctl modules it imports, at the top or inside a function (an import
    deferred for speed still ties the two modules together)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {_known(a.name) for a in node.names if a.name.startswith("llmctl")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                if base.startswith("llmctl"):
                    # `from llmctl.stages import sft` imports a module; `import X` a name in one
                    targets |= {_known(f"{base}.{a.name}") for a in node.names}
        graph[module] = targets - {None, module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def test_no_import_cycle():
    graph = import_graph()
    assert graph["llmctl.recipe"] and graph["llmctl.pipeline"]  # the graph was really built
    found = cycles(graph)
    detail = [f"{c}: " + "; ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c)
              for c in found]
    assert not found, "import cycles:\n" + "\n".join(detail)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _stage_name_tests(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, stage) for each comparison with a stage's name (``x == "sft"``,
    ``stage in ("data", "ppo")``) and each hand-written list of stage names (a copy of what
    the registry says, which drifts from it)."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                items = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) \
                    else [operand]
                hits += [(node.lineno, c.value) for c in items
                         if isinstance(c, ast.Constant) and c.value in STAGES]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) > 1 and all(
                isinstance(c, ast.Constant) and c.value in STAGES for c in node.elts):
            hits += [(node.lineno, c.value) for c in node.elts]
    return sorted(set(hits))


def test_only_the_registry_and_stage_modules_test_a_stage_name():
    allowed = {"llmctl.stages"} | {m for m in MODULES if m.startswith("llmctl.stages.")}
    found = [f"{MODULES[m].relative_to(PACKAGE.parent)}:{line} names stage {stage!r}"
             for m in MODULES if m not in allowed
             for line, stage in _stage_name_tests(ast.parse(MODULES[m].read_text()))]
    assert not found, ("ask the stage's StageSpec instead of naming the stage:\n"
                       + "\n".join(found))


def test_stage_name_finder_sees_comparisons_and_lists():
    tree = ast.parse('if stage == "sft" or name in ("data", "quantize") or x != "other": pass\n'
                     'TRAINING = ("dpo", "ppo")\nKEYS = ("data", "model")')
    assert [s for _, s in _stage_name_tests(tree)] == ["quantize", "sft", "dpo", "ppo"]
