"""The Triton kernel package (``kernels/``, installed as ``cbd_fast.kernels``) has no import cycle."""
import ast
import pathlib

KERNELS = pathlib.Path(__file__).resolve().parent.parent / "kernels"


def _import_graph() -> dict[str, set[str]]:
    """Module -> modules of the same package it imports, at module level or inside functions (relative imports)."""
    modules = {path.stem for path in KERNELS.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((KERNELS / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [alias.name for alias in node.names]
                deps.update(t for t in targets if t in modules)
        graph[name] = deps - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state = {}  # module -> "open" while on the search path, "done" after

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernel_modules_import_without_a_cycle():
    graph = _import_graph()
    assert {"_compile", "_spec", "banzhaf", "maxsim"} <= set(graph)
    assert _cycle(graph) is None, f"import cycle in kernels/: {' -> '.join(_cycle(graph))}"
