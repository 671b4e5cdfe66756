"""The package's shape (docs/layout.md): rooms by job, at most five modules at the top,
no import circle, and every import pointing down the rooms' order (lazy imports inside
functions count; imports only for type checking do not)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "cl_runner"
# Highest first: a room may import the rooms after it, never those before it.
ORDER = ["cli", "memory_plan", "training", "reporting", "checkpoints", "config", "strategies", "evaluation",
         "distributed", "models", "streams", "ops", "errors"]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """cl_runner modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING"
               for n in ast.walk(node)}
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        targets = set()
        for imported in runtime_imports(path):
            if imported in modules and imported != name:
                targets.add(imported)
        # `from pkg import submodule` imports the submodule, not a circle through pkg
        edges[name] = {t for t in targets if not (t in name.split(".") or name.startswith(t + "."))}
    return edges


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "<package>"


def test_at_most_five_modules_at_the_top():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 5, top


def test_no_import_circle():
    edges = graph()
    seen: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in edges.get(node, ()):
            if seen.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]))
            if nxt not in seen:
                visit(nxt, path + [node])
        seen[node] = 2

    for start in sorted(edges):
        if start not in seen:
            visit(start, [])


def test_imports_point_down_the_rooms():
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = []
    for source, targets in graph().items():
        for target in targets:
            a, b = room(source), room(target)
            if a != b and a in rank and b in rank and rank[b] < rank[a]:
                wrong.append(f"{source} -> {target}")
    rooms = {room(m) for m in graph()} - {"<package>"}
    assert rooms <= set(ORDER), f"rooms missing from ORDER: {rooms - set(ORDER)}"
    assert not wrong, wrong


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Any module imported first works (no order dependence): every module, in sorted and
    in reverse order, in two fresh interpreters."""
    modules = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if "_fake" not in p.name)
    for order in (modules, modules[::-1]):
        code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % order
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
