"""The layering docs/design.md states ("Layers") holds for every import of hashtag/*.py.

Parses each module with `ast` (no import, no Ray): module-level and function-level
`from hashtag import x`, `from hashtag.x import y`, `import hashtag.x` and relative imports.
No module imports a module of a higher layer, and the module-level imports have no cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "hashtag"
DESIGN = REPO / "docs" / "design.md"


def layer_table() -> dict[str, int]:
    """{module: layer} from the table under docs/design.md's "## Layers" heading."""
    text = DESIGN.read_text()
    start = text.index("\n## Layers\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    layers: dict[str, int] = {}
    for match in re.finditer(r"^\| (\d+) \| [^|]* \| ([^|]+) \|$", section, re.MULTILINE):
        for name in match.group(2).split(","):
            name = name.strip()
            assert name not in layers, f"docs/design.md lists {name} in two layers"
            layers[name] = int(match.group(1))
    assert layers, "docs/design.md has no layer table under '## Layers'"
    return layers


def project_imports(path: Path, own: str | None = None) -> tuple[set[str], set[str]]:
    """(module-level, inside functions or classes) hashtag modules that `path` imports; for a
    file of the sub-package `own`, its imports of that package (relative or by name) are left
    out."""
    top: set[str] = set()
    nested: set[str] = set()

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name.split(".")[1] for a in node.names if a.name.startswith("hashtag.")]
        if not isinstance(node, ast.ImportFrom):
            return []
        if node.level:  # relative: from . import x, from .x import y
            if own is not None:
                return []  # inside the sub-package itself
            return [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
        if node.module == "hashtag":
            return [a.name for a in node.names]
        if node.module and node.module.startswith("hashtag."):
            return [node.module.split(".")[1]]
        return []

    def visit(node: ast.AST, nested_scope: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested_scope or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
            )
            (nested if inner else top).update(names(child))
            visit(child, inner)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return top - {own}, nested - {own}


def modules() -> dict[str, tuple[set[str], set[str]]]:
    """{module: (module-level, nested) imports}; a sub-package (hashtag/models/) is one module:
    the union of its files' imports, less its own (relative or by its own name)."""
    found = {
        path.stem: project_imports(path)
        for path in sorted(PACKAGE.glob("*.py"))
        if path.stem != "__init__"
    }
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        package = init.parent
        top: set[str] = set()
        nested: set[str] = set()
        for path in sorted(package.glob("*.py")):
            file_top, file_nested = project_imports(path, own=package.name)
            top |= file_top
            nested |= file_nested
        found[package.name] = (top, nested)
    return found


def test_every_module_has_one_layer():
    table = layer_table()
    found = set(modules())
    assert found - set(table) == set(), "modules missing from docs/design.md's layer table"
    assert set(table) - found == set(), "docs/design.md's layer table names modules that are gone"


def test_no_upward_import():
    table = layer_table()
    upward = []
    for module, (top, nested) in modules().items():
        for imported in sorted(top | nested):
            assert imported in table, f"{module} imports hashtag.{imported}, which does not exist"
            if table[imported] > table[module]:
                upward.append(
                    f"{module} (layer {table[module]}) imports {imported} (layer {table[imported]})"
                )
    assert upward == []


def test_no_cycle_in_module_level_imports():
    graph = {module: top for module, (top, _) in modules().items()}
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == 1:
                cycle = path[path.index(imported) :] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_jobs_are_thin_entry_points():
    """jobs/*.py import the package only through its command line."""
    for path in sorted((REPO / "jobs").glob("*.py")):
        top, nested = project_imports(path)
        assert top | nested <= {"cli"}, f"{path.name} imports {sorted(top | nested)}"


def test_the_checker_sees_every_import_form(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from hashtag import storage, tags\n"
        "import hashtag.errors\n"
        "from hashtag.metrics import evaluate\n"
        "from . import results\n"
        "def f():\n"
        "    from hashtag.models import create\n"
        "    import hashtag.tune as t\n"
    )
    top, nested = project_imports(source)
    assert top == {"storage", "tags", "errors", "metrics", "results"}
    assert nested == {"models", "tune"}


def test_the_pure_core_imports_no_opencv():
    """Models, formats and embedder specs load without OpenCV (only decoders and the classic
    embedder need it): checked in a fresh interpreter, where nothing imported it yet."""
    import subprocess
    import sys

    probe = (
        "import sys; import hashtag.models, hashtag.dataset, hashtag.shards, hashtag.embedders, "
        "hashtag.export; assert 'cv2' not in sys.modules, 'cv2 imported'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO, timeout=300)
