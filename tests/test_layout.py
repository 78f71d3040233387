"""The package layout is kept, not remembered: imports run one way through the stages, nothing imports in a
circle, and every subpackage says in its docstring what it holds and may import.

Stages, lowest first (a module may import its own stage and the ones below it, never one above):

    config, host, plotting -> layer -> model -> formats -> offload -> upcycling -> parallel -> train -> shift -> compress -> serve -> compare -> cli

The imports read are every ``import moekit...`` / ``from moekit... import ...`` in the source, at module level
and inside functions alike (a lazy import upward is still a dependency upward). One exception is allowed, and
listed: ``Transformer.save_pretrained`` / ``from_pretrained`` are thin methods that call into ``formats`` from
inside the method, for the Hugging Face-style API.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moekit"

STAGES = ["config", "host", "layer", "model", "formats", "offload", "upcycling", "parallel", "train", "shift", "compress", "serve", "compare", "cli"]
STAGE_OF_TOP = {"config": 0, "host": 0, "plotting": 0, "__init__": len(STAGES), "__main__": len(STAGES)}

# (importing module, imported module prefix, enclosing function): the thin format methods on the model
ALLOWED_UPWARD = {
    ("moekit.model.transformer", "moekit.formats", "save_pretrained"),
    ("moekit.model.transformer", "moekit.formats", "from_pretrained"),
}

# modules over ~500 lines that are one cohesive thing (their docstring says why)
LONG_MODULES: dict[str, str] = {
    "moekit/cli.py": "one module mapping every verb to its typed function: the parsers and their printing",
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def stage(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return len(STAGES)  # moekit/__init__.py: the public API re-exports every stage
    top = parts[1]
    if top in STAGE_OF_TOP:
        return STAGE_OF_TOP[top]
    return STAGES.index(top)


def resolve(name: str) -> str:
    """The module an imported name lives in: ``moekit.layer.moe.MoE`` -> ``moekit.layer.moe``."""
    while name not in MODULES:
        name = name.rsplit(".", 1)[0]
    return name


def imports(mod: str) -> list[tuple[str, str | None]]:
    """(imported module, enclosing function or None) for every moekit import in ``mod``."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, str | None]] = []
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST, func: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            f = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                found.extend((resolve(a.name), f) for a in child.names if a.name.startswith("moekit"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: from the package of this module
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - child.level + 1]
                    base = ".".join([*pkg, base] if base else pkg)
                if base.startswith("moekit"):
                    for a in child.names:
                        found.append((resolve(f"{base}.{a.name}"), f))
            visit(child, f)

    visit(tree, None)
    return [(m, f) for m, f in found if m != mod]


GRAPH = {m: imports(m) for m in MODULES}


def test_every_subpackage_has_a_docstring_saying_what_it_holds_and_may_import():
    for mod, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path}: no module docstring"
        if path.name == "__init__.py" and mod != "moekit":
            assert "import" in doc.lower(), f"{path}: the docstring should say what the subpackage may import"


def test_imports_run_one_way_through_the_stages():
    upward = []
    for mod, edges in GRAPH.items():
        for target, func in edges:
            if stage(target) > stage(mod):
                allowed = any(mod == a and target.startswith(b) and func == c for a, b, c in ALLOWED_UPWARD)
                if not allowed:
                    upward.append(f"{mod} imports {target}" + (f" (in {func})" if func else ""))
    assert not upward, "imports against the stage order:\n" + "\n".join(upward)


def test_no_import_circle_anywhere():
    """Depth-first search over every import edge (module level and inside functions): any back edge is a circle.
    Package __init__ files count as modules, so re-exports that close a loop are caught too."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for target, func in GRAPH[m]:
            if any(m == a and target.startswith(b) and func == c for a, b, c in ALLOWED_UPWARD):
                continue  # the listed thin methods are the one allowed way up
            if state.get(target) == 1:
                circles.append(" -> ".join([*stack[stack.index(target):], target]))
            elif target not in state:
                dfs(target)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            dfs(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m != "moekit.__main__"))  # (__main__ runs the CLI)
def test_every_module_imports(mod):
    importlib.import_module(mod)


def test_modules_stay_short_unless_listed():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > 520}
    unlisted = {p: n for p, n in long.items() if p not in LONG_MODULES}
    assert not unlisted, f"modules over ~500 lines (split them, or list them with the reason): {unlisted}"
    for p in LONG_MODULES:
        assert p in long, f"{p} is short now: take it off LONG_MODULES"


def test_the_public_api_is_importable_from_the_package():
    import moekit

    for name in ("from_pretrained", "save_pretrained", "MoE", "MoEConfig", "ModelConfig", "Transformer", "KVCache",
                 "MoEOutput", "MoEStats", "Router", "RoutingResult", "convert", "export_hf", "upcycle",
                 "CheckpointError"):
        assert hasattr(moekit, name), name


def test_no_package_attribute_hides_one_of_its_modules():
    """``from moekit.x.y import y`` in a package __init__ would make ``moekit.x.y`` the function for getattr (and so
    for ``import moekit.x.y as m`` and monkeypatch paths), not the module."""
    hidden = []
    for mod in MODULES:
        parts = mod.split(".")
        if len(parts) < 2 or mod == "moekit.__main__":  # (__main__ runs the CLI)
            continue
        parent = importlib.import_module(".".join(parts[:-1]))
        child = importlib.import_module(mod)
        if getattr(parent, parts[-1], child) is not child:
            hidden.append(mod)
    assert not hidden, f"package attributes that hide a module of the same name: {hidden}"


def test_test_files_have_unique_names():
    """The test folders are not packages, so pytest imports each test file by its basename: two files of one name
    in different folders fail collection on a clean clone (a stale __pycache__ hides it on a working copy)."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, list[str]] = {}
    for p in tests.rglob("test_*.py"):
        seen.setdefault(p.name, []).append(str(p.relative_to(tests)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test files sharing a basename (rename one): {clashes}"
