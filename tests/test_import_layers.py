"""The package's layers, and a walk of every import under ldm/ (at the top of a module or inside a function) that
fails on an import cycle or on a module importing a layer above its own.

A module belongs to the layer of the longest entry of `LAYERS` that names it or a package holding it. It may
import modules of its own layer and of the layers below. The order says what depends on what: a model is built
from network parts and knows nothing of datasets, of the sampling API, of callbacks or of the command line; a
dataset may know models (none needs to); the API loads and samples models; training runs and logs them; the
command line drives everything.
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "ldm"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Files, configs, checkpoints, console and image grids: nothing that knows a network.
    ("foundation", ("ldm", "ldm.assets", "ldm.checkpoint", "ldm.config", "ldm.console", "ldm.csv_logger",
                    "ldm.divergence", "ldm.image_io", "ldm.lr_scheduler", "ldm.model_files", "ldm.optim",
                    "ldm.progress", "ldm.run_lock", "ldm.util", "ldm.visualization")),
    # Network parts: U-Net, autoencoder networks, encoders, losses, and the diffusion maths.
    ("modules", ("ldm.modules",)),
    # The Lightning modules and what a model is built, fine-tuned or converted with (base weights, new words, prior
    # preservation's settings, LoRA, a swapped first stage, the diffusers names of its parts).
    ("models", ("ldm.models", "ldm.diffusers_bridge", "ldm.finetune", "ldm.lora", "ldm.lora_formats",
                "ldm.new_words", "ldm.prior_preservation", "ldm.vae")),
    # Datasets and the data module.
    ("data", ("ldm.data",)),
    # The user API: loading trained models, sampling, interpolation, evaluation of samples.
    ("api", ("ldm.evaluation", "ldm.inference", "ldm.interpolation", "ldm.model_loading")),
    # Training runs: Lightning callbacks, the images they log, a run's prior images.
    ("training", ("ldm.callbacks", "ldm.image_logs", "ldm.prior_images")),
    # The command line.
    ("cli", ("ldm.cli", "ldm.script_args")),
)


class Import(NamedTuple):
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{module_path(self.importer)}:{self.line} imports {self.imported}"


def module_path(name: str) -> str:
    path = ROOT / Path(*name.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT))


def modules() -> dict[str, Path]:
    """Every module under ldm/ by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, source: str, package: str, known: set[str]) -> Iterator[Import]:
    """The ldm modules `name` (in `package`, for relative imports) imports anywhere in `source`, functions included;
    ``from package import submodule`` counts as the submodule, ``from module import name`` as the module."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, base] if base else parents)
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                yield Import(name, target, node.lineno)


def layer_of(name: str) -> int:
    """The index in `LAYERS` of the longest entry naming `name` or a package above it; -1 when none does. The entry
    ``ldm`` is the package's own __init__ only: a new module of it is placed by hand, not put in the lowest layer."""
    best, best_length = -1, -1
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            holds = name == entry or (entry != PACKAGE and name.startswith(entry + "."))
            if holds and len(entry) > best_length:
                best, best_length = index, len(entry)
    return best


def import_graph() -> dict[str, list[Import]]:
    """Each module's imports of ldm modules, in line order."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = imports(name, path.read_text(encoding="utf-8"), package, set(known))
        graph[name] = sorted(set(found), key=lambda edge: edge.line)
    return graph


def cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as its imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in graph[node]:
            if edge.imported not in index:
                visit(edge.imported)
                low[node] = min(low[node], low[edge.imported])
            elif edge.imported in stack:
                low[node] = min(low[node], index[edge.imported])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or any(e.imported == node for e in graph[node]):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A path of imports inside `component` from its first module back to it (breadth-first: the shortest)."""
    start = min(component)
    paths: dict[str, list[Import]] = {start: []}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in graph[node]:
                if edge.imported == start:
                    return paths[node] + [edge]
                if edge.imported in component and edge.imported not in paths:
                    paths[edge.imported] = paths[node] + [edge]
                    following.append(edge.imported)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_every_layer_entry_names_a_module():
    known = modules()
    missing = [entry for _, entries in LAYERS for entry in entries if entry not in known]
    assert not missing, f"LAYERS names modules that do not exist: {missing}"


def test_every_module_has_a_layer():
    unplaced = [name for name in modules() if layer_of(name) < 0]
    assert not unplaced, f"put these modules in a layer of LAYERS: {unplaced}"
    assert layer_of("ldm.a_new_module") < 0 and layer_of("ldm.models.a_new_model") == layer_of("ldm.models")


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{edge} (layer {LAYERS[layer_of(edge.imported)][0]}, above {LAYERS[layer_of(edge.importer)][0]})"
              for edges in import_graph().values() for edge in edges
              if layer_of(edge.imported) > layer_of(edge.importer)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    found = ["\n  ".join(str(edge) for edge in cycle) for cycle in cycles(import_graph())]
    assert not found, "import cycles:\n  " + "\n\n  ".join(found)


def test_the_walk_finds_imports_inside_functions_and_relative_ones():
    source = ("import os\nimport ldm.util as u\n"
              "def f():\n    from ldm.inference import sample_latents\n"
              "from . import ddim\n")
    found = imports("ldm.models.diffusion.ddpm", source, "ldm.models.diffusion", set(modules()))
    assert sorted((edge.imported, edge.line) for edge in found) == [
        ("ldm.inference", 4), ("ldm.models.diffusion.ddim", 5), ("ldm.util", 2)]


def test_a_cycle_is_found_and_named_by_its_imports():
    graph = {"a": [Import("a", "b", 3)], "b": [Import("b", "c", 1), Import("b", "d", 2)],
             "c": [Import("c", "a", 7)], "d": []}
    assert [[(edge.importer, edge.imported) for edge in cycle] for cycle in cycles(graph)] == [
        [("a", "b"), ("b", "c"), ("c", "a")]]
