"""The package's import layering (ARCHITECTURE.md): no module imports a higher layer, and there are no cycles.

Every ``import lepton_jax...`` in the package counts, including imports inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lepton_jax"
# lowest first; a module may import its own layer's siblings (without cycles) and any lower layer
LAYERS = [
    {"errors", "config", "plugins", "files"},
    {"lake", "tracking"},
    {"data"},
    {"models"},
    {"parallel", "eval"},
    {"checkpoint", "model_store", "robust"},
    {"train"},
    {"serve", "runs", "sweep"},
    {"commands", "cli", "__init__", "__main__", "configs"},
]


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lepton_jax"):
                if node.module != "lepton_jax":  # `from lepton_jax import tracking` imports tracking, not __init__
                    targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lepton_jax")}
        graph[module] = targets
    modules = set(graph)
    return {m: {t for t in ts if t in modules} for m, ts in graph.items()}


def test_no_upward_imports():
    upward = [(m, t) for m, ts in _imports().items() for t in ts if _layer(_unit(t)) > _layer(_unit(m))]
    assert not upward, upward


def test_no_import_cycles_between_units():
    edges = {}
    for m, ts in _imports().items():
        for t in ts:
            if _unit(t) != _unit(m):
                edges.setdefault(_unit(m), set()).add(_unit(t))
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in edges.get(node, ()):
            visit(nxt)
        stack.pop()

    for node in list(edges):
        visit(node)
    assert not cycles, cycles
