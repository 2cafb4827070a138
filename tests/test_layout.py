"""The package's layout: no import cycle inside tritter_comm/, and _native imported only where
the issue says (codec.py and weight sync's binding)."""

import ast
from pathlib import Path

import tritter_comm

PKG = Path(tritter_comm.__file__).resolve().parent


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set) -> set:
    """The tritter_comm modules ``path`` takes something from, at any depth of the file
    (function-level imports too: a cycle through a lazy import is still a cycle). ``from X
    import y`` depends on ``X.y`` where that is a module, else on ``X``."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("tritter_comm")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("tritter_comm"):
                out |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                        for a in node.names}
    return out


def _graph():
    files = {_module(p): p for p in PKG.rglob("*.py")}
    modules = set(files) | {"tritter_comm._native"}  # the Rust extension
    return {m: {i for i in _imports(p, modules) if i in modules and i != m}
            for m, p in files.items()}


def test_no_import_cycle_inside_the_package():
    graph = _graph()
    done, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in done:
            return
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            visit(n)
        stack.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_native_is_imported_by_the_codec_and_the_weight_sync_binding_only():
    users = sorted(m for m, ns in _graph().items() if "tritter_comm._native" in ns)
    # the codec, weight sync's binding and the phase optimizer's predictor binding (each the
    # thin layer over its own part of the Rust core)
    allowed = {"tritter_comm.codec", "tritter_comm.optim._predictor"} | {
        m for m in users if m.startswith("tritter_comm.sync")}
    assert set(users) <= allowed, users
