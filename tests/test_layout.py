"""The package tree is layered in data-flow order (README "Layout"): every module imports only
layers listed before its own, nothing imports a private name from another package, and the
import graph has no circle (deferred imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]

#: Bottom to top, as in the README's layout section.
LAYERS = ["errors", "ir", "targets", "infra", "capture", "legality", "surrogate", "passes",
          "quant", "train", "cost", "pipelines", "legalize", "selection", "transform", "export",
          "demo",
          "workflow", "cli", "archnet_fx"]


def _modules() -> dict[str, Path]:
    out = {}
    for base, prefix in ((ROOT / "archnet_fx", ["archnet_fx"]), (ROOT / "passes",
                         ["archnet_fx", "passes"]), (ROOT / "targets", ["archnet_fx", "targets"])):
        for p in base.rglob("*.py"):
            parts = prefix + list(p.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "archnet_fx"


def _imports(modules: dict[str, Path]):
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("archnet_fx"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    yield mod, (full if full in modules else node.module), a.name


def test_every_module_is_in_a_listed_layer():
    assert {_layer(m) for m in _modules()} <= set(LAYERS)


def test_layers_import_only_layers_below_them():
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = sorted(f"{src} imports {dst}" for src, dst, _ in _imports(_modules())
                 if rank[_layer(dst)] > rank[_layer(src)])
    assert not bad, "\n".join(bad)


def test_no_import_circle_and_no_private_name_across_packages():
    modules = _modules()
    g = nx.DiGraph()
    private = []
    for src, dst, name in _imports(modules):
        if dst != src and _layer(src) != "archnet_fx":
            g.add_edge(src, dst)
        if name.startswith("_") and _layer(src) != _layer(dst):
            private.append(f"{src} imports {dst}.{name}")
    assert not private, private
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]
