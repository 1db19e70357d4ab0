"""The package's import layering (ARCHITECTURE.md): no module imports a higher layer, and there are no cycles.

Every ``import lepton_jax...`` in the package counts, including imports inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lepton_jax"
# lowest first; a module may import its own layer's siblings (without cycles) and any lower layer
LAYERS = [
    {"errors", "config", "plugins", "files", "signals"},
    {"lake", "tracking"},
    {"data"},
    {"models"},
    {"parallel", "eval", "tasks"},
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


def _sources() -> dict[str, str]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p.read_text()
            for p in PACKAGE.rglob("*.py")}


def _imports(sources: dict[str, str] | None = None) -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``sources`` (module -> code) replaces the files, for tests.

    ``from pkg import sub`` imports the submodule ``sub``; it counts ``pkg`` itself only when it also takes a name
    that is not a submodule (``pkg/__init__`` running first is how Python loads any submodule, not a dependency),
    and never for the top package (its ``__version__`` is no dependency on the CLI)."""
    sources = _sources() if sources is None else sources
    modules = set(sources)
    graph = {}
    for module, code in sources.items():
        targets = set()
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lepton_jax"):
                subs = {f"{node.module}.{a.name}" for a in node.names}
                targets |= subs
                if not subs <= modules and node.module != "lepton_jax":  # `from lepton_jax import __version__`
                    targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("lepton_jax")}
        graph[module] = targets
    return {m: {t for t in ts if t in modules and t != m} for m, ts in graph.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk of ``edges`` meets (each as a closed path), empty when there is none."""
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(edges):
        visit(node)
    return cycles


def test_no_upward_imports():
    upward = [(m, t) for m, ts in _imports().items() for t in ts if _layer(_unit(t)) > _layer(_unit(m))]
    assert not upward, upward


def test_no_import_cycles_between_units():
    edges = {}
    for m, ts in _imports().items():
        for t in ts:
            if _unit(t) != _unit(m):
                edges.setdefault(_unit(m), set()).add(_unit(t))
    cycles = _cycles(edges)
    assert not cycles, cycles


def test_no_import_cycles_between_modules():
    """Inside a package too (train/edge.py -> train/strategy.py -> train/edge.py was one), imports run one way."""
    cycles = _cycles(_imports())
    assert not cycles, cycles


def test_a_cycle_inside_a_package_is_found():
    """The check itself: a function-level import back into a sibling is a cycle; `from pkg import sub` is not."""
    sources = {"lepton_jax.train": "", "lepton_jax.train.a": "from lepton_jax.train.b import B\n",
               "lepton_jax.train.b": "def f():\n    from lepton_jax.train.a import A\n",
               "lepton_jax.train.c": "from lepton_jax.train import a\n"}
    assert _cycles(_imports(sources)) == [["lepton_jax.train.a", "lepton_jax.train.b", "lepton_jax.train.a"]]
