"""The core package's layout (specdec/__init__.py): every import inside ``specdec`` points down the list of rooms
(base -> verify -> drafters -> running -> training -> measure), no module imports itself back through a cycle,
and the core never imports ``analysis/`` or ``methods/`` (the registry's discovery excepted)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "specdec"
ROOMS = {"base": 0, "verify": 1, "drafters": 2, "running": 3, "training": 4, "measure": 5}
BASE_MODULES = {"specdec", "specdec.errors", "specdec.models", "specdec.backends"}
ALLOWED_METHODS_IMPORT = {"specdec.verify.proposer"}  # registry(): `import methods` registers every method


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    if module in BASE_MODULES:
        return "base"
    return module.split(".")[1]


def imports(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (top level and inside functions alike)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def core_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in CORE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_core_imports_neither_analysis_nor_methods():
    bad = []
    for path in CORE.rglob("*.py"):
        name = module_name(path)
        for target in imports(path):
            top = target.split(".")[0]
            if top == "analysis" or (top == "methods" and name not in ALLOWED_METHODS_IMPORT):
                bad.append(f"{name} -> {target}")
    assert not bad, bad


def test_every_core_import_points_down_the_rooms():
    upward = [f"{a} ({room(a)}) -> {b} ({room(b)})" for a, targets in core_graph().items() for b in targets
              if ROOMS[room(b)] > ROOMS[room(a)]]
    assert not upward, upward


def test_no_import_cycle_in_the_core():
    graph = core_graph()
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path, monkeypatch):
    """The reader is not vacuous: a verify module importing the runner is upward, and two modules importing
    each other are a cycle."""
    graph = {"specdec.verify.tree": {"specdec.running.runner"}, "specdec.running.runner": set()}
    assert [(a, b) for a, t in graph.items() for b in t if ROOMS[room(b)] > ROOMS[room(a)]]
    module = tmp_path / "specdec" / "verify" / "x.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..running import runner\nfrom . import tree\nimport analysis.latency\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert {"specdec.running.runner", "specdec.verify.tree", "analysis.latency"} <= imports(module)
