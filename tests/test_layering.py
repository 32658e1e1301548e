"""The walls between layers hold (DESIGN.md, "Layers"): checked on the source, import by import.

- csrc/ and kernels/ import nothing of fastsearch (kernels only each other, relatively);
- fastsearch.ops never imports the layers above it (search, diffusion, integrations, models, demos);
- search/ and diffusion/ reach kernels only through the ops (no fastsearch.kernels, _C or torch.ops.fastsearch);
- the core never imports fastsearch.integrations;
- no module imports a private name (or private module) of a package it does not belong to;
- the import graph between fastsearch's packages has no cycle.

Lazy imports inside functions count: they are dependencies all the same.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fastsearch"
UPPER_LAYERS = ("search", "diffusion", "integrations", "models", "demos")
# The command line, the demos and the benchmark cases: front ends that may import anything.
FRONT_ENDS = ("fastsearch.cli", "fastsearch.__main__", "fastsearch.bench", "fastsearch.demos")


def _module_name(path: Path, root: Path, prefix: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([prefix, *parts]) if parts else prefix


def _sources() -> dict[str, Path]:
    """Every Python module of the package (fastsearch.kernels from the kernels/ folder itself)."""
    found = {_module_name(p, PACKAGE, "fastsearch"): p for p in PACKAGE.rglob("*.py")
             if "kernels" not in p.relative_to(PACKAGE).parts}
    found.update({_module_name(p, ROOT / "kernels", "fastsearch.kernels"): p for p in (ROOT / "kernels").glob("*.py")})
    return found


SOURCES = _sources()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import statement of a module, relative ones resolved.

    ``from a.b import c`` gives ``a.b.c`` (a submodule or a name of a.b: both are dependencies on a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


IMPORTS = {name: _imports(name, path) for name, path in SOURCES.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(modules, predicate) -> list[str]:
    return [f"{SOURCES[m].relative_to(ROOT)}:{line} imports {target}"
            for m in modules for target, line in IMPORTS[m] if predicate(m, target)]


def test_the_source_tree_is_found():
    assert {"fastsearch", "fastsearch.ops", "fastsearch.search", "fastsearch.diffusion",
            "fastsearch.kernels.select"} <= set(SOURCES)


def test_kernels_import_nothing_of_fastsearch():
    kernels = [m for m in SOURCES if _within(m, "fastsearch.kernels")]
    bad = _violations(kernels, lambda m, t: _within(t, "fastsearch") and not _within(t, "fastsearch.kernels"))
    assert not bad, bad


def test_csrc_includes_nothing_of_the_python_package():
    include = re.compile(r'#\s*include\s*[<"]([^>"]+)[>"]')
    bad = []
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix in (".cpp", ".h", ".cu", ".cuh"):
            for target in include.findall(path.read_text()):
                if target.startswith(("fastsearch", "kernels", "../")):
                    bad.append(f"{path.relative_to(ROOT)} includes {target}")
    assert not bad, bad


def test_ops_never_import_the_layers_above():
    ops = [m for m in SOURCES if _within(m, "fastsearch.ops")]
    bad = _violations(ops, lambda m, t: any(_within(t, f"fastsearch.{layer}") for layer in UPPER_LAYERS)
                      or any(_within(t, front) for front in FRONT_ENDS))
    assert not bad, bad


def test_search_and_diffusion_reach_kernels_only_through_ops():
    algorithms = [m for m in SOURCES if _within(m, "fastsearch.search") or _within(m, "fastsearch.diffusion")]
    bad = _violations(algorithms, lambda m, t: _within(t, "fastsearch.kernels") or _within(t, "fastsearch._C")
                      or _within(t, "fastsearch._backend") or t.startswith("triton"))
    for module in algorithms:
        text = SOURCES[module].read_text()
        bad += [f"{SOURCES[module].relative_to(ROOT)} calls torch.ops.fastsearch"] if "torch.ops.fastsearch" in text \
            else []
    assert not bad, bad


def test_the_core_never_imports_integrations():
    core = [m for m in SOURCES if not _within(m, "fastsearch.integrations")
            and not any(_within(m, front) for front in FRONT_ENDS)]
    bad = _violations(core, lambda m, t: _within(t, "fastsearch.integrations"))
    assert not bad, bad


def _private_owner(target: str) -> str | None:
    """The package a private name or module of ``target`` belongs to (None if nothing in it is private).

    ``fastsearch.ops._common.Op`` belongs to ``fastsearch.ops``; ``fastsearch.diffusion.search._Weights`` to
    ``fastsearch.diffusion`` (a module's private names are shared with the modules of its package)."""
    parts = target.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            owner = ".".join(parts[:index])
            if owner in SOURCES and SOURCES[owner].name != "__init__.py":
                owner = owner.rpartition(".")[0]
            return owner
    return None


def test_no_module_imports_another_packages_private_names():
    def foreign_private(module: str, target: str) -> bool:
        if not _within(target, "fastsearch"):
            return False  # third-party private APIs are a separate matter (torch's dispatcher queries)
        owner = _private_owner(target)
        return owner is not None and not _within(module, owner)

    bad = _violations(SOURCES, foreign_private)
    assert not bad, bad


def _node(module: str) -> str:
    """Graph node of a module: its subpackage (fastsearch.ops, ...) or, for a top-level module, itself."""
    parts = module.split(".")
    if len(parts) >= 2 and (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _target_module(target: str) -> str | None:
    """The fastsearch module an imported dotted name lives in (longest known prefix)."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in SOURCES:
            return candidate
    return None


def test_no_package_cycles():
    graph = defaultdict(set)
    for module, imports in IMPORTS.items():
        for target, _ in imports:
            found = _target_module(target) if _within(target, "fastsearch") else None
            if found is not None and _node(found) != _node(module):
                graph[_node(module)].add(_node(found))
    state, cycles = {}, []

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


@pytest.mark.parametrize("rule", ["ops", "private", "cycles"])
def test_the_checks_catch_a_planted_violation(rule, monkeypatch):
    """Each check fails on a made-up import that breaks its rule."""
    planted = {"ops": ("fastsearch.ops.select", "fastsearch.search.types.Completion",
                       test_ops_never_import_the_layers_above),
               "private": ("fastsearch.diffusion.search", "fastsearch.ops._common.Op",
                           test_no_module_imports_another_packages_private_names),
               "cycles": ("fastsearch.ops.steps", "fastsearch.diffusion.samplers.Sampler", test_no_package_cycles)}
    module, target, check = planted[rule]
    monkeypatch.setitem(IMPORTS, module, [*IMPORTS[module], (target, 1)])
    with pytest.raises(AssertionError):
        check()
