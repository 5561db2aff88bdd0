"""Imports point down the layers: a module of microtrain/ may import modules of its own layer and of
the layers below it, never one above; no two modules import each other (directly or round a loop).

Imports are read with ``ast`` from the source, so imports inside functions count as much as those
at the top. An import inside a function body is allowed only for an optional dependency (Pillow,
matplotlib, dask) or with a comment on or just above it that says why.

A new module: add its name to ``LAYERS`` below, in the lowest layer that holds every microtrain
module it imports (the failure message names that layer).
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "microtrain"

# Bottom layer first. Names are relative to microtrain ("kernels" covers the whole subpackage,
# "__init__" is the package's own file). Names not written yet are assigned already, so that the
# modules in flight land where they belong.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundations", ("paths", "architecture", "checks", "stats")),  # import nothing of microtrain
    ("kernels", ("kernels",)),
    ("engine", ("selection", "memory", "autograd", "optim")),
    ("files", ("torch_archive", "weight_format", "layouts", "checkpoint", "classifier_format", "data")),
    ("network", ("lite_residual", "model")),
    ("episodes", ("episodes",)),
    ("training", ("train",)),
    ("methods", ("method_plan", "tinytrain", "tinytrain_plus", "tinytl", "methods")),
    ("pipeline", ("pipeline", "classifier")),
    ("commands", ("adapt", "predict", "evaluation", "evaluation_report", "cluster", "evaluate", "metatrain", "summary",
                  "__init__")),
)

OPTIONAL_DEPENDENCIES = ("PIL", "matplotlib", "dask", "distributed")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the entry naming ``module`` or the package holding it (longest wins)."""
    best = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    return None if best is None else best[0]


def _imports(module: str) -> list[tuple[str, int]]:
    """(microtrain module imported, line) for every import statement in ``module``, at any depth."""
    path = MODULES[module]
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    if module == "__init__":
        package = []
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "microtrain":
                base = node.module.split(".")[1:]
            else:
                continue
            base_name = ".".join(base)
            subs = [f"{base_name}.{a.name}" if base_name else a.name for a in node.names]
            targets = [f"microtrain.{s}" for s in subs if s in MODULES]
            if base_name or not targets:  # `from .kernels import conv` runs kernels/__init__.py too
                targets.append(f"microtrain.{base_name}" if base_name else "microtrain")
        else:
            continue
        for target in targets:
            if target == "microtrain":
                found.append(("__init__", node.lineno))
            elif target.startswith("microtrain."):
                found.append((target[len("microtrain."):], node.lineno))
    return found


def test_every_module_is_in_the_layer_table():
    flat = [name for _, names in LAYERS for name in names]
    assert len(flat) == len(set(flat)), f"a name is in two layers of LAYERS: {sorted(flat)}"
    missing = []
    for module in MODULES:
        if layer_of(module) is None:
            needed = max((layer_of(t) or 0 for t, _ in _imports(module)), default=0)
            missing.append(f"microtrain/{MODULES[module].relative_to(PACKAGE)} is in no layer: add "
                           f"{module!r} to LAYERS in tests/test_layering.py, in layer {LAYERS[needed][0]!r} "
                           "(the lowest holding what it imports) or above")
    assert not missing, "\n".join(missing)


def test_imports_point_down():
    upward = []
    for module in MODULES:
        mine = layer_of(module)
        if mine is None:
            continue  # reported by test_every_module_is_in_the_layer_table
        for target, line in _imports(module):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                upward.append(f"microtrain/{MODULES[module].relative_to(PACKAGE)}:{line}: {module} "
                              f"(layer {LAYERS[mine][0]!r}) imports {target} (layer {LAYERS[theirs][0]!r}, above)")
    assert not upward, "imports must point down the layers:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in graph[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def _explained(lines: list[str], lineno: int) -> bool:
    """A comment on the import's line, or in the comment/import lines directly above it."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if not (text.startswith("import ") or text.startswith("from ")):
            return False
        i -= 1
    return False


def test_imports_inside_functions_are_optional_dependencies_or_say_why():
    hidden = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for func in ast.walk(ast.parse(source, str(path))):
            if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    roots, what = [a.name for a in node.names], ", ".join(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    roots = ["." if node.level else node.module]
                    what = "." * node.level + (node.module or "") + " import " + ", ".join(a.name for a in node.names)
                else:
                    continue
                optional = all(r.split(".")[0] in OPTIONAL_DEPENDENCIES for r in roots)
                if not optional and not _explained(lines, node.lineno):
                    hidden.append(f"microtrain/{path.relative_to(PACKAGE)}:{node.lineno}: "
                                  f"import of {what} inside {func.name}()")
    assert not hidden, ("imports inside functions hide the layering; move them to the top, or say why in a "
                        "comment on the line or just above:\n" + "\n".join(hidden))


def test_the_checker_sees_what_it_must(tmp_path, monkeypatch):
    """The rules catch what they are for: an upward import inside a function, a cycle, an
    unexplained import in a function, a module missing from the table."""
    pkg = tmp_path / "microtrain"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "kernels" / "__init__.py").write_text("from .conv import x\n")
    (pkg / "kernels" / "conv.py").write_text("x = 1\n")
    (pkg / "paths.py").write_text("def f():\n    from .model import Network\n")
    (pkg / "model.py").write_text("from .kernels import conv\nfrom . import paths\nNetwork = 1\n")
    (pkg / "unlisted.py").write_text("from microtrain.model import Network\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    monkeypatch.setitem(globals(), "MODULES", {_module_name(p): p for p in sorted(pkg.rglob("*.py"))})
    assert sorted(MODULES) == ["__init__", "kernels", "kernels.conv", "model", "paths", "unlisted"]
    assert sorted(_imports("model")) == [("kernels", 1), ("kernels.conv", 1), ("paths", 2)]
    assert _imports("kernels") == [("kernels.conv", 1)]
    checks = {
        test_imports_point_down: "paths.py:2: paths .layer 'foundations'. imports model .layer 'network', above",
        test_no_import_cycles: "import cycle: .*model -> paths -> model|paths -> model -> paths",
        test_imports_inside_functions_are_optional_dependencies_or_say_why: r"paths.py:2: import of \.model import Network inside f\(\)",
        test_every_module_is_in_the_layer_table: "unlisted.py is in no layer: add 'unlisted' .* in layer 'network'",
    }
    for check, message in checks.items():
        with pytest.raises(AssertionError, match=message):
            check()
    (pkg / "paths.py").write_text("def f():\n    from PIL import Image\n    import json  # the reason\n")
    test_imports_inside_functions_are_optional_dependencies_or_say_why()


def test_the_readers_load_without_the_engine():
    """The file readers (checkpoints, weight files, datasets) sit below the engine: importing them
    loads neither Numba nor the tape (tools/torch_adapt.py relies on it)."""
    code = ("import sys, microtrain.checkpoint, microtrain.weight_format, microtrain.data, microtrain.summary\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numba' or m in "
            "('microtrain.autograd', 'microtrain.kernels', 'microtrain.model', 'microtrain.episodes')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent).stdout
    assert out.strip() == "[]"
