"""The library's shape: modules import each other in one direction, and evaluation computes without files."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "hdkdlib"


def _module_graph():
    """{module: modules of hdkdlib it imports at module level} (imports inside functions are deferred on purpose)."""
    files = {".".join(p.relative_to(LIB.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in LIB.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                edges |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in files}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def _cycle(graph):
    """One import circle as a list of modules, or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_circle_between_library_modules():
    graph = _module_graph()
    assert "hdkdlib.step" in graph["hdkdlib.train"] and "hdkdlib.runfolder" in graph["hdkdlib.train"]  # it sees edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # and would see a circle


def test_evaluation_touches_no_file():
    source = (LIB / "evaluation.py").read_text()
    for word in ("runfolder", "RunFolder", "open(", "json", "records.", "Path(", "torch.save", "torch.load"):
        assert word not in source, word
