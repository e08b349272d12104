"""The package map in docs/DEVELOPING.md, kept true: which layer may import which, read from
the source (every import statement, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "purifier"

GRPC = ("grpc", "grpc_health", "grpc_reflection", "grpc_status", "google.protobuf")
CORE = {"purifier", "purifier.errors", "purifier.models", "purifier.checkpoint", "purifier.projection",
        "purifier.validation", "purifier.data", "purifier.hardware", "purifier.stats", "purifier.detection",
        "purifier.offline", "purifier.policy"}
TRANSPORT = ("purifier.server", "purifier.proto")
ENTRY = ("purifier.cli", "purifier.commands", "purifier.settings")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from . import x`` gives ``pkg.x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def outside(names, layer) -> list[str]:
    """The purifier modules among ``names`` that are not in ``layer`` (a name imported from a
    module of the layer, ``purifier.errors.ConfigError``, counts as in it; the package's own
    ``__init__`` is everyone's)."""
    modules = set(layer) - {"purifier"}
    return sorted(m for m in names if m.startswith("purifier.") and m != "purifier.__version__"
                  and not under(m, modules) and m.rpartition(".")[0] not in modules)


MODULES = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))
           if not under(module_name(p), ("purifier.proto",))}


def test_outside_flags_what_it_should():
    assert outside({"purifier", "purifier.errors", "purifier.errors.ConfigError", "numpy"}, CORE) == []
    assert outside({"purifier.evaluation.report", "purifier.server.app", "purifier.engine.Engine"}, CORE) == [
        "purifier.engine.Engine", "purifier.evaluation.report", "purifier.server.app"]


def test_the_walk_sees_the_package():
    assert {"purifier.projection", "purifier.engine.engine", "purifier.server.app", "purifier.cli"} <= set(MODULES)
    assert "grpc" in MODULES["purifier.server.app"]                       # it reads real imports ...
    assert "purifier.errors" in MODULES["purifier.projection"]            # ... relative ones resolved
    assert "purifier.checkpoint" in MODULES["purifier.engine.engine"]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not under(n, TRANSPORT + ENTRY)))
def test_only_the_transport_and_entry_points_import_grpc(name):
    assert not [m for m in MODULES[name] if under(m, GRPC)], f"{name} imports gRPC/protobuf"


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_imports_nothing_above_it(name):
    assert not outside(MODULES[name], CORE), f"{name} imports {outside(MODULES[name], CORE)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if under(n, ("purifier.engine",))))
def test_the_engine_imports_only_the_core_and_itself(name):
    bad = outside(MODULES[name], CORE | {"purifier.engine"})
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if not under(n, TRANSPORT + ENTRY)))
def test_nothing_but_entry_points_imports_the_transport(name):
    bad = [m for m in MODULES[name] if under(m, TRANSPORT + ("purifier.commands", "purifier.cli"))]
    assert not bad, f"{name} imports {bad}"


def test_no_module_sits_loose_beside_the_core():
    """The tree is the map: every top-level module is core or an entry point; the rest live in
    a folder named for its concern."""
    loose = {module_name(p) for p in PACKAGE.glob("*.py")} - CORE - {"purifier.cli", "purifier.settings"}
    assert not loose, f"modules outside a concern's folder: {sorted(loose)}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if under(n, ("purifier.evaluation",))))
def test_evaluation_imports_only_the_core_and_itself(name):
    bad = outside(MODULES[name], CORE | {"purifier.evaluation"})
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES
                                        if under(n, ("purifier.training", "purifier.benchmark"))))
def test_training_and_benchmarking_import_the_core_and_evaluation_only(name):
    own = "purifier." + name.split(".")[1]
    bad = outside(MODULES[name], CORE | {"purifier.evaluation", own})
    assert not bad, f"{name} imports {bad}"
