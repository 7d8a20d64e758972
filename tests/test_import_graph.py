"""The package's layers, checked on the import graph (every import statement, in functions too).

The attacker side never reaches ground truth: nothing ``gradleak.attacks`` imports, directly or
through any chain of gradleak modules, is ``gradleak.data``, ``gradleak.metrics`` or
``gradleak.reporting``. Lower layers never import the layers above them.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

import gradleak

ROOT = Path(gradleak.__file__).parent


def _module_file(name: str) -> Path | None:
    if name == "gradleak":
        return ROOT / "__init__.py"
    rel = Path(*name.split(".")[1:])
    for candidate in (ROOT / rel / "__init__.py", ROOT / rel.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _name_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = ["gradleak", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def imports_of(name: str) -> frozenset[str]:
    """The gradleak modules that module ``name`` imports (any statement, anywhere in the file, except
    under ``if TYPE_CHECKING:``: an import for annotations only is not a dependency at run time)."""
    path = _module_file(name)
    if path is None:
        return frozenset()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # empty the type-only blocks first
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from gradleak import data`
    out = set()
    for mod in found:
        if mod == "gradleak" or mod.startswith("gradleak."):
            while mod != "gradleak" and _module_file(mod) is None:
                mod = mod.rsplit(".", 1)[0]  # `from gradleak.x import SomeClass` -> gradleak.x
            out.add(mod)
    return frozenset(out - {name})


def reachable(start: str) -> dict[str, list[str]]:
    """Every gradleak module ``start`` reaches, with one import chain to it."""
    chains = {start: [start]}
    todo = [start]
    while todo:
        mod = todo.pop()
        for nxt in sorted(imports_of(mod)):
            if nxt not in chains:
                chains[nxt] = chains[mod] + [nxt]
                todo.append(nxt)
        # a submodule import runs its package's __init__ too (not gradleak's own: its re-exports of
        # attacks, labels and models are a convenience for users, not a dependency of a layer)
        parent = mod.rsplit(".", 1)[0]
        if parent.startswith("gradleak.") and parent not in chains:
            chains[parent] = chains[mod] + [parent]
            todo.append(parent)
    return chains


def _starts(package: str) -> list[str]:
    """The modules of a package, or the one module of that name."""
    path = ROOT / Path(*package.split(".")[1:])
    if path.with_suffix(".py").is_file():
        return [package]
    found = sorted(_name_of(p) for p in path.rglob("*.py"))
    assert found, f"no modules under {package}"
    return found


FORBIDDEN = {
    "gradleak.attacks": ("gradleak.data", "gradleak.metrics", "gradleak.reporting", "gradleak.audit", "gradleak.cli",
                         "gradleak.bench", "gradleak.integrations", "gradleak.sweep"),
    "gradleak.labels": ("gradleak.attacks", "gradleak.data", "gradleak.metrics", "gradleak.reporting", "gradleak.audit"),
    "gradleak.threat": ("gradleak.attacks", "gradleak.reporting", "gradleak.audit", "gradleak.cli"),
    "gradleak.metrics": ("gradleak.attacks", "gradleak.reporting", "gradleak.audit", "gradleak.cli"),
}


def _hits(module: str, banned: tuple[str, ...]) -> list[str]:
    found = reachable(module)
    return [" -> ".join(chain) for mod, chain in found.items()
            if mod != "gradleak" and any(mod == b or mod.startswith(b + ".") for b in banned)]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_reach_the_layers_above(layer: str):
    bad = [hit for module in _starts(layer) for hit in _hits(module, FORBIDDEN[layer])]
    assert not bad, "\n".join(bad[:5])


def test_the_check_sees_indirect_and_lazy_imports(tmp_path, monkeypatch):
    """The graph follows chains and imports inside functions (a text grep of attacks/ would not)."""
    assert "gradleak.attacks.matching" in reachable("gradleak.attacks.cinet")
    assert "gradleak.labels.recover" in reachable("gradleak.attacks.base")  # through gradleak.labels
    chain = reachable("gradleak.cli.attack_cmd")
    assert "gradleak.reporting.runner" in chain and "gradleak.metrics.score" in chain
    # a lazy import inside a function body is an edge too
    assert "gradleak.audit.cell" in imports_of("gradleak.sweep.runner")
