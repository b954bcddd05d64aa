"""The package's imports run one way (docs/DESIGN.md, "Layout"): read every module's imports with ast, module level
and inside functions, and check them against the layers. A lower layer never imports a higher one, the library core
never imports the tooling (fused_lora.cli, fused_lora.bench), and there is no import circle, lazy or not.

The checker is tested on made-up graphs too, so a test that cannot fail would show up here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "fused_lora"

# Lowest first. A module may import modules of its own layer or below; a module not listed here fails the test (a
# new module must be given a place). Prefixes name subpackages.
LAYERS = [
    ["fused_lora._common"],
    ["fused_lora.backend", "fused_lora._ext", "fused_lora._C", "fused_lora.testing"],  # _C: the compiled extension
    ["fused_lora.kernels"],
    ["fused_lora.reference", "fused_lora.codec", "fused_lora.cpu", "fused_lora.bnb_compat"],
    ["fused_lora.nf4"],
    ["fused_lora.functional", "fused_lora.optim", "fused_lora._dora", "fused_lora.dora", "fused_lora.mixed",
     "fused_lora.checkpoint"],
    ["fused_lora.modules"],
    ["fused_lora.peft", "fused_lora.peft_routes"],
    ["fused_lora"],  # the package's __init__: the public names
    ["fused_lora.cli", "fused_lora.bench", "fused_lora.__main__"],  # tooling, on top
]
TOOLING = ("fused_lora.cli", "fused_lora.bench", "fused_lora.__main__")


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix that names ``module`` (KeyError when none does)."""
    best = None
    for index, names in enumerate(LAYERS):
        for name in names:
            # "fused_lora" names the package's __init__ alone, every other entry its submodules too
            if module == name or (name != "fused_lora" and module.startswith(name + ".")):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    if best is None:
        raise KeyError(f"{module} has no layer in tests/test_layers.py LAYERS; give it one")
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def imports_of(path: Path, modules) -> list[tuple[str, int, bool]]:
    """(imported package module, line, inside a function) for every import of a fused_lora module in ``path``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "fused_lora":
                        out.append((alias.name, child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "fused_lora":
                    continue
                for alias in child.names:  # `from . import functional` imports a module, `from .nf4 import X` not
                    candidate = f"{target}.{alias.name}"
                    out.append((candidate if candidate in modules else target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def import_graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _package_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def upward_imports(graph) -> list[str]:
    """Every import of a higher layer, and every import of the tooling from the core."""
    problems = []
    for importer, edges in graph.items():
        for imported, line, lazy in edges:
            where = f"{importer}:{line}{' (inside a function)' if lazy else ''}"
            if layer_of(imported) > layer_of(importer):
                problems.append(f"{where} imports {imported}, a higher layer")
            elif imported.startswith(TOOLING) and not importer.startswith(TOOLING):
                problems.append(f"{where}: the library core imports the tooling module {imported}")
    return problems


def import_circles(graph) -> list[list[str]]:
    """The import circles (lazy imports included), each as the list of modules around it."""
    edges = {m: sorted({i for i, _, _ in e if i != m and i in graph}) for m, e in graph.items()}
    circles, state, stack = [], {}, []

    def walk(module):
        state[module] = "open"
        stack.append(module)
        for nxt in edges[module]:
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt)
        stack.pop()
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            walk(module)
    return circles


def test_every_module_has_a_layer():
    for module in _package_modules():
        layer_of(module)


def test_no_import_runs_up_a_layer_or_into_the_tooling():
    assert upward_imports(import_graph()) == []


def test_no_import_circle():
    assert import_circles(import_graph()) == []


def test_the_checker_finds_an_upward_import_and_a_circle():
    graph = {
        "fused_lora.nf4": [("fused_lora.functional", 7, True)],
        "fused_lora.functional": [("fused_lora.nf4", 3, False)],
        "fused_lora.modules": [("fused_lora.cli.demo", 9, True)],
    }
    problems = upward_imports(graph)
    assert any("fused_lora.nf4:7 (inside a function) imports fused_lora.functional" in p for p in problems)
    assert any("fused_lora.modules:9 (inside a function) imports fused_lora.cli.demo" in p for p in problems)
    assert import_circles(graph) == [["fused_lora.functional", "fused_lora.nf4", "fused_lora.functional"]]


def test_the_checker_reads_relative_imports():
    modules = _package_modules()
    edges = imports_of(PACKAGE_DIR / "__init__.py", modules)
    assert ("fused_lora.functional", 0, False) in [(m, 0, lazy) for m, _, lazy in edges]
    with pytest.raises(KeyError, match="has no layer"):
        layer_of("fused_lora.somewhere_new")


def test_no_package_file_over_600_lines():
    long = {str(p.relative_to(PACKAGE_DIR)): n for p in PACKAGE_DIR.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}  # fmt: skip
    assert long == {}
