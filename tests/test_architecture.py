"""The code's shape: small modules, no import cycles, one training path for every dataset size."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdcil_jax"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules that ``name`` imports anywhere in its file (top level or in functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def test_no_module_over_450_lines():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    # A package importing its own submodules (sdcil_jax.data -> sdcil_jax.data.x) is how packages
    # re-export; only cycles between modules count.
    for name in graph:
        graph[name] = {d for d in graph[name] if not d.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_one_training_path():
    """No second step/loop for the host pipeline, no switch on the pipeline kind outside data/."""
    for name, path in _modules().items():
        text = path.read_text()
        assert "make_host_" not in text, name
        if not name.startswith("sdcil_jax.data"):
            assert "self.host" not in text and "hasattr(ds" not in text, name
            assert "train_source" not in text, name


def _private_uses(tree: ast.AST) -> list[str]:
    """Private names (``_x``, not dunder) a module imports from, or reads off, another library.

    Attribute reads on ``self``/``cls`` and on names bound by ``from sdcil_jax... import`` or
    ``import sdcil_jax...`` are the project's own; every other ``obj._x`` is reported.
    """
    own, found = {"self", "cls"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            project = node.level > 0 or (node.module or "").startswith("sdcil_jax")
            for alias in node.names:
                if project:
                    own.add(alias.asname or alias.name)
                elif alias.name.startswith("_"):
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            own.update(a.asname or a.name for a in node.names if a.name.startswith("sdcil_jax"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            base = node.value.id if isinstance(node.value, ast.Name) else None
            if base not in own:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_private_api_of_another_library():
    """No private name of diffusers, transformers, jax or any other library is used (issue 11: the
    sampler is built on diffusers' public modules, not on the pipeline's ``_generate``)."""
    found = {name: uses for name, path in _modules().items()
             if (uses := _private_uses(ast.parse(path.read_text())))}
    assert not found, found
    # the check itself can fail
    assert _private_uses(ast.parse("pipe._generate(ids, params)")) == [
        "line 1: pipe._generate"]
    assert _private_uses(ast.parse("from diffusers.utils import _get_model_file")) == [
        "from diffusers.utils import _get_model_file"]
    assert _private_uses(ast.parse("from sdcil_jax import config as c\nc._leaves()")) == []
