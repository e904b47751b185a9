"""The code's shape (docs/architecture.md, "Layout"): no import cycle in the engine, the engine never
imports Qt, short method ``run`` functions, no docstring pointing at a document outside the repository."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "kamal_engine"


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found |= {target, *(f"{target}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def engine_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ENGINE.rglob("*.py")}
    # a module importing its own package (``from . import Param``) is no cycle: the package does not need it
    return {m: {t for t in imports(p) if t in modules and t != m and not m.startswith(t + ".")}
            for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_engine_has_no_import_cycle():
    assert find_cycle(engine_graph()) is None


def test_the_engine_never_imports_qt():
    for path in ENGINE.rglob("*.py"):
        qt = {m for m in imports(path) if m.split(".")[0] in ("PySide6", "pyqtgraph", "kamal_app")}
        assert not qt, f"{path} imports {qt}"


def test_every_method_run_is_short():
    for path in (ENGINE / "methods").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                assert node.end_lineno - node.lineno < 60, f"{path}:{node.lineno} run is {node.end_lineno - node.lineno + 1} lines"


def test_docstrings_cite_sections_of_the_repositorys_own_docs():
    """No docstring cites a document outside the repository; each ``docs/architecture.md, "Section"``
    it cites is a heading there."""
    headings = {line.lstrip("#").strip() for line in (ROOT / "docs" / "architecture.md").read_text().splitlines()
                if line.startswith("#")}
    cited = 0
    for folder in ("kamal_engine", "kamal_app", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "test_layout.py":  # this file names what it looks for
                continue
            text = path.read_text()
            assert "DESIGN" not in text, path
            for section in re.findall(r'docs/architecture\.md`*,? "([^"]+)"', text):
                section = " ".join(section.split())  # a citation may wrap in a docstring
                assert section in headings, f"{path} cites a section docs/architecture.md does not have: {section!r}"
                cited += 1
    assert cited >= 10
