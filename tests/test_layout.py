"""The package's shape: every module imports on its own, imports go one way between the stages
(cli -> targets -> measure -> runtimes -> export -> pruning -> base modules), there are no import
cycles, no top-level name is defined in two modules, and what `pip install` ships is the checkout."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "sparse_export"
# stage of each subpackage; a module may import modules of its own stage or of lower stages only
STAGES = {"cli": 6, "targets": 5, "measure": 4, "serve": 4, "runtimes": 3, "export": 2, "recovery": 1.5,
          "pruning": 1}
BASE = 0  # modules directly in sparse_export/: models, data, archs, outputs, report, errors, ...


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def stage(module: str) -> int:
    parts = module.split(".")
    return STAGES.get(parts[1], BASE) if len(parts) > 1 else BASE


def imported(module: str, path: Path, modules: set[str]) -> set[str]:
    """Package modules `module` imports anywhere in its file (top level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:   # `from x import function` -> module x
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    mods = set(files)
    # a package's __init__ is imported by every module below it: count only real dependencies
    return {m: {d for d in imported(m, p, mods) if not m.startswith(d + ".")} for m, p in files.items()}


def test_every_module_imports_on_its_own():
    """Each module imported with no other package module loaded before it (one interpreter, the
    package's modules dropped from sys.modules between imports)."""
    code = (
        "import importlib, sys\n"
        f"mods = {sorted(module_files())!r}\n"
        "bad = []\n"
        "for m in mods:\n"
        "    for k in [k for k in sys.modules if k == 'sparse_export' or k.startswith('sparse_export.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_imports_go_one_way_between_stages():
    wrong = [f"{m} ({stage(m)}) imports {d} ({stage(d)})"
             for m, deps in import_graph().items() for d in deps if stage(d) > stage(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    state, cycles = {}, []

    def visit(m, path):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_the_graph_checks_can_fail(tmp_path):
    """The parser sees relative imports inside functions (what a cycle through a lazy import needs)."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from ..export import onnx_plain\n    from .. import models\n")
    mods = {"sparse_export.models", "sparse_export.export", "sparse_export.export.onnx_plain"}
    assert imported("sparse_export.pruning.m", f, mods) == {"sparse_export.export", "sparse_export.export.onnx_plain",
                                                            "sparse_export.models"}


def test_no_top_level_name_defined_twice():
    """A public function, class or constant has one home: the same name in two modules is two things."""
    where = {}
    for module, path in module_files().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, ast.Assign):
                names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                if not name.startswith("_") and name not in ("app",):
                    where.setdefault(name, []).append(module)
    twice = {n: m for n, m in where.items() if len(m) > 1}
    assert not twice, twice


def test_install_ships_the_checkout():
    """`pip install` finds exactly the package folders a plain checkout imports."""
    setuptools = pytest.importorskip("setuptools")
    found = set(setuptools.find_packages(str(ROOT), include=["sparse_export*"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PKG.rglob("__init__.py")}
    assert found == on_disk
    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["sparse_export*"]' in text and "package-dir" not in text


def test_no_sys_path_edits():
    hits = [str(p.relative_to(ROOT)) for folder in ("sparse_export", "tests", "benchmarks", "scripts")
            for p in (ROOT / folder).rglob("*.py") if "sys.path.insert" in p.read_text() and p != Path(__file__)]
    assert not hits, hits


def test_modules_have_docstrings_and_public_functions_type_hints():
    missing = []
    for module, path in module_files().items():
        tree = ast.parse(path.read_text())
        if not ast.get_docstring(tree):
            missing.append(f"{module}: no docstring")
        if ".cli." in module:  # Typer commands: their annotations are the CLI's option types
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_") and node.returns is None:
                missing.append(f"{module}.{node.name}: no return type")
    assert not missing, "\n".join(missing)
