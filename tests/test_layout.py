"""The shape of the code a reader follows: no import cycles (errors at the bottom, the command
line at the top), and the README's walk through one training step names at most four files,
each of which exists with the functions it names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "jax_impl", "torch_ref", "parity", "parity_tests", "scripts", "bench")


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports anywhere (lazy imports in functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return found & modules


def import_graph() -> dict[str, set[str]]:
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"]
    modules = {module_of(p) for p in paths}
    return {module_of(p): project_imports(p, modules) for p in paths}


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    assert len(graph) > 30  # the walk found the project

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            module, path = stack.pop()
            for dep in graph[module]:
                if dep == start:
                    return path + [dep]
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, path + [dep]))
        return None

    cycles = [" -> ".join(c) for m in graph if (c := cycle_from(m))]
    assert not cycles, cycles


def test_errors_are_the_bottom_and_the_command_line_the_top():
    graph = import_graph()
    assert graph["common.errors"] == set()
    assert not any("common.cli" in deps for module, deps in graph.items() if module.startswith("common."))


def test_the_readmes_training_step_walks_through_at_most_four_files():
    readme = (ROOT / "README.md").read_text()
    walk = readme.split("## One training step, through the files", 1)[1].split("\n## ", 1)[0]
    named = re.findall(r"`([\w/]+\.py)(?::([\w.]+))?`", walk)
    files = {path for path, _ in named}
    assert 2 <= len(files) <= 4, files
    for path, name in named:
        source = (ROOT / path).read_text()
        if name:  # `file.py:function` or `file.py:Class.method`
            assert re.search(rf"^\s*(def|class) {name.split('.')[-1]}\b", source, re.M), f"{path}:{name}"
