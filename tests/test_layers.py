"""The layers of the package, read from its imports (module level and inside functions alike).

commands/cli -> stages -> (prune, quant, engine, export) -> (model, data); the pruning core imports no
engine, data, stage or CLI code; nothing in the library imports the CLI; the module graph has no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "compress"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set:
    """Every compress module a file imports (``from . import x`` resolved against its package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("compress")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("compress"):
                continue
            for a in node.names:  # `from .x import y` where y is a module counts as importing x.y
                sub = f"{mod}.{a.name}"
                found.add(sub if _is_module(sub) else mod)
    return {m for m in found if m != name}


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict:
    return {module_name(p): imports_of(p) for p in PKG.rglob("*.py")}


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "compress"


def test_nothing_in_the_library_imports_the_cli():
    for mod, deps in graph().items():
        if _layer(mod) in ("commands", "cli"):
            continue
        bad = {d for d in deps if _layer(d) in ("commands", "cli")}
        assert not bad, f"{mod} imports {bad}"


def test_the_pruning_core_is_pure():
    for mod, deps in graph().items():
        if _layer(mod) == "prune":
            bad = {d for d in deps if _layer(d) in ("engine", "data", "stages", "quant", "commands", "cli", "recipe")}
            assert not bad, f"{mod} imports {bad}"


def test_arrows_point_down():
    below = {"stages": {"commands", "cli", "recipe"}, "engine": {"stages", "commands", "cli", "recipe"},
             "quant": {"stages", "commands", "cli", "recipe"}, "model": {"engine", "stages", "prune", "quant",
                                                                         "commands", "cli", "recipe", "data"},
             "data": {"engine", "stages", "prune", "quant", "commands", "cli", "recipe", "model"}}
    for mod, deps in graph().items():
        banned = below.get(_layer(mod), set())
        bad = {d for d in deps if _layer(d) in banned}
        assert not bad, f"{mod} imports {bad}"


def test_the_module_graph_has_no_cycle():
    g = graph()
    state = {}

    def visit(m, path):
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if d not in g:
                continue
            if state.get(d) == "open":
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                raise AssertionError(" -> ".join(cycle))
            if d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
