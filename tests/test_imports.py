"""The project's modules import one way: a test that builds the import graph from the source.

A module imported by another never imports it back, not even inside a function (docs/architecture.md
draws the graph). `python cgtgan.py` is the one exception by construction: the script's
`if __name__ == "__main__":` block imports the command line, which imports `cgtgan` as a module, so
the block is left out of the graph.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}

# Project imports made inside a function, each with the reason it cannot sit at the top.
DEFERRED = {("cli", "commands"): "--help answers without importing torch"}


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def project_imports(path: Path) -> tuple[set[str], set[str]]:
    """(modules of this project that `path` imports, those it imports inside a function)."""
    tree = ast.parse(path.read_text())
    found, deferred = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        if _is_main_guard(node):
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in MODULES and name != path.stem:
                found.add(name)
                if in_function:
                    deferred.add(name)
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found, deferred


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules a -> b -> ... -> a, or None when the graph has no cycle."""
    state, stack = {}, []

    def dfs(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_project_modules_import_one_way():
    graph = {name: project_imports(path)[0] for name, path in MODULES.items()}
    assert graph["commands"] >= {"train", "runs"} and "cgtgan" in graph["train"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_project_imports_inside_functions_are_the_listed_ones():
    deferred = {(name, dep) for name, path in MODULES.items() for dep in project_imports(path)[1]}
    assert deferred == set(DEFERRED), (
        "a project module imported inside a function; import it at the top, or list it in "
        f"DEFERRED with the reason: {sorted(deferred - set(DEFERRED))}")


# A module is read in one sitting, a function on one screen or two (docs/architecture.md).
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 700, 60


def test_modules_and_functions_fit_one_sitting():
    long_modules = {name: n for name, path in MODULES.items()
                    if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    long_functions = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}")
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: {long_functions}"


def test_mutation_testing_copies_every_module():
    """mutmut (docs/mutation.md) runs the tests in a copy of the project: every module must be
    mutated or copied there, or the copy cannot import."""
    import configparser

    section = configparser.ConfigParser()
    section.read(ROOT / "setup.cfg")
    listed = set(section["mutmut"]["source_paths"].split()) | set(section["mutmut"]["also_copy"].split())
    assert {f"{name}.py" for name in MODULES} <= listed, sorted({f"{n}.py" for n in MODULES} - listed)
