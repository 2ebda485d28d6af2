"""The package's module boundaries, read from its source: no import cycles, models/ and formats/ stay leaves, and
each module imports only from its own layer or the ones below (README, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "workbench"

LAYERS: list[tuple[str, ...]] = [
    ("workbench.models", "workbench.flow", "workbench.presets", "workbench.toyflow", "workbench.step_cache"),
    (
        "workbench.settings",
        "workbench.preprocess",
        "workbench.limits",
        "workbench.errors",
        "workbench.metadata",
        "workbench.formats",
        "workbench.quantization",
        "workbench.kernels",
        "workbench.offload",
    ),
    ("workbench.memory", "workbench.lora", "workbench.acceleration", "workbench.layout_guidance"),
    (
        "workbench.pipeline",
        "workbench.shapesworld.world",
        "workbench.shapesworld.raster",
        "workbench.shapesworld.binding",
        "workbench.shapesworld.layout",
    ),
    ("workbench.loading", "workbench.controlnet", "workbench"),
    (
        "workbench.frames",
        "workbench.sweep",
        "workbench.viz",
        "workbench.lora_training",
        "workbench.onnx_export",
        "workbench.shapesworld",
    ),
    ("workbench.ui", "workbench.cli", "workbench.__main__"),
]
"""Lowest first. A module belongs to the layer of its longest listed prefix (``workbench`` alone: the package's
``__init__``)."""
LEAVES = {
    "workbench.models": ("workbench.models",),
    "workbench.formats": ("workbench.formats", "workbench.models", "workbench.presets"),
}
"""Packages that may import only the listed parts of the workbench."""


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(tree: ast.AST, modules: dict[str, Path], current: str) -> set[str]:
    """Workbench modules ``tree`` imports at run time (module level or inside functions; not under
    ``if TYPE_CHECKING``). ``from workbench.x import name`` counts ``workbench.x.name`` when that is a module."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            targets = []
        for target in targets:
            if target.split(".")[0] == "workbench":
                found.add(resolve(target))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(current)
    found.discard(None)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: _imported(ast.parse(path.read_text()), modules, name) for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := walk(start)) is not None:
            return cycle
    return None


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != "workbench" and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, layer = len(prefix), index
    if layer is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return layer


def violations(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in sorted(edges.items()):
        for target in sorted(imports):
            if layer_of(target) > layer_of(module):
                found.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
            for leaf, allowed in LEAVES.items():
                inside = module == leaf or module.startswith(leaf + ".")
                if inside and not any(target == a or target.startswith(a + ".") for a in allowed):
                    found.append(f"{module} imports {target}, outside {allowed}")
    return found


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_every_import_follows_the_layers():
    assert violations(import_graph()) == []


def test_cycle_and_layer_checks_catch_a_planted_fault():
    edges = import_graph()
    edges["workbench.memory"] = edges["workbench.memory"] | {"workbench.pipeline"}
    assert find_cycle(edges) is None  # one direction only: a layer fault, not yet a cycle
    assert violations(edges) == ["workbench.memory (layer 2) imports workbench.pipeline (layer 3)"]
    edges["workbench.lora"] = edges["workbench.lora"] | {"workbench.pipeline"}
    edges["workbench.pipeline"] = edges["workbench.pipeline"] | {"workbench.lora"}
    cycle = find_cycle(edges)
    assert cycle is not None and cycle[0] == cycle[-1]
    edges = import_graph()
    edges["workbench.models.vae"] = edges["workbench.models.vae"] | {"workbench.flow"}
    assert violations(edges) == [
        "workbench.models.vae imports workbench.flow, outside ('workbench.models',)",
    ]


def test_type_checking_imports_do_not_count():
    modules = module_names()
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from workbench.pipeline import Pipeline\n"
    tree = ast.parse(source)
    assert _imported(tree, modules, "workbench.offload") == set()
    tree = ast.parse("def f():\n    from workbench.kernels import PackedLinear\n")
    assert _imported(tree, modules, "workbench.lora") == {"workbench.kernels"}


def test_the_package_never_imports_diffusers():
    """diffusers is a test and benchmark dependency only (docs/design.md, "Architecture")."""
    found = []
    for name, path in module_names().items():
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            found += [f"{name} imports {m}" for m in modules if m.split(".")[0] == "diffusers"]
    assert found == []


def test_models_read_no_files():
    """models/ builds networks; files are read by formats/ and loading (docs/design.md, "Architecture")."""
    file_modules = {"json", "os", "io", "pathlib", "shutil", "safetensors"}
    found = []
    for name, path in module_names().items():
        if not name.startswith("workbench.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            found += [f"{name} imports {m}" for m in modules if m.split(".")[0] in file_modules]
            if isinstance(node, ast.Attribute) and node.attr in ("from_pretrained", "save_pretrained", "open"):
                found.append(f"{name} calls .{node.attr}")
    assert found == []
