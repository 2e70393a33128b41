"""raypo's layers import only downward, and no module takes part in an import cycle (docs/architecture.md).

Every ``import`` in ``raypo/`` counts, including the lazy ones inside functions: a lazy import still makes
the lower layer depend on the higher one. The order, lowest first:
"""

from __future__ import annotations

import ast
from pathlib import Path

import raypo

# Lowest first. A module may import modules of its own layer or of a layer below it, never above.
# ``losses`` sits below ``config``: it is a pure tensor library that knows nothing of runs, and the config
# checks loss names and hyperparameters against its registry. ``model`` sits below ``data``: the data
# pipeline's tokenizer stage loads tokenizers from model sources (raypo.model.loading). ``report`` reads the
# files runs and sweeps write and imports nothing above ``train``.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "storage", "progress", "testing", "__init__"),
    ("losses",),
    ("config",),
    ("model",),
    ("data",),
    ("train",),
    ("eval", "report"),
    ("tune",),
    ("launch",),
    ("cli",),
]

PACKAGE = Path(raypo.__file__).parent


def _layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: top-level name {top!r} is in no layer of LAYERS; add it there")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The raypo modules ``path`` imports (``from raypo.a import b`` is ``raypo.a.b`` if b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name == "raypo" or a.name.startswith("raypo.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                node.module == "raypo" or node.module.startswith("raypo.")):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in _MODULES else node.module)
    return found


_FILES = sorted(PACKAGE.rglob("*.py"))
_MODULES = {_module_name(p) for p in _FILES}
GRAPH = {_module_name(p): _imports(p) for p in _FILES}


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        _layer_of(module)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    upward = []
    for module, deps in graph.items():
        for dep in deps:
            if dep == "raypo":
                continue
            if _layer_of(dep) > _layer_of(module):
                upward.append(f"{module} (layer {LAYERS[_layer_of(module)]}) imports {dep} "
                              f"(layer {LAYERS[_layer_of(dep)]})")
    return sorted(upward)


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = upward_imports(GRAPH)
    assert not upward, "upward imports:\n" + "\n".join(upward)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), over imports between modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph or w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_what_they_are_for() -> None:
    """The two checks on a planted graph: config.validate -> tune.space -> config.validate, the cycle issue 12
    removed (config below the sweep code)."""
    planted = {**GRAPH, "raypo.config.validate": GRAPH["raypo.config.validate"] | {"raypo.tune.space"},
               "raypo.tune.space": GRAPH.get("raypo.tune.space", set()) | {"raypo.config.validate"}}
    assert set(upward_imports(planted)) - set(upward_imports(GRAPH)) == {
        "raypo.config.validate (layer ('config',)) imports raypo.tune.space (layer ('tune',))"}
    assert any({"raypo.config.validate", "raypo.tune.space"} <= set(c) for c in cycles(planted))
