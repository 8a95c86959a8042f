"""The layers point one way (STYLE.md, rule 10), held by reading every module's imports.

    domain  ←  vocabulary and ports  ←  adapters  ←  stages  ←  composition root  ←  entry points

- the domain imports only the domain, and no I/O library;
- the vocabulary and port modules import only the domain (adapters for types only);
- adapters import no stage, no composition root and no entry point;
- stages import adapter modules for types only (under `TYPE_CHECKING`): the composition
  root builds the adapters and hands them over;
- support modules (settings, metrics, retries, tracing…) import no stage;
- no import loop among the package's modules.

A new module must be placed in a layer below, so its place is a decision on record.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[2] / "recon_stream"

VOCABULARY = {"ports", "providers", "dead_letters", "roles"}
STAGES = {
    "ingest",
    "scanner",
    "scheduler",
    "commands",
    "outbox",
    "feeds",
    "notifier",
    "snapshots",
    "rerating",
    "verifier",
    "attribution",
    "dismissals",
}
SUPPORT = {
    "settings",
    "metrics",
    "retry",
    "tracing",
    "seen",
    "status",
    "contracts",
    "policy",
    "samples",  # bundled data files
    "__init__",  # the package itself: its version
}
ROOT = {"app"}
ENTRY_POINTS = {"cli", "dev", "exposure_table", "embedded", "__main__"}
IO_LIBRARIES = {
    "aiokafka",
    "faststream",
    "pymongo",
    "bson",
    "motor",
    "shodan",
    "requests",
    "httpx",
    "urllib3",
    "socket",
    "asyncio",
    "opentelemetry",
    "prometheus_client",
    "subprocess",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["recon_stream", "domain"]:
        return "domain"
    if parts[:2] == ["recon_stream", "adapters"]:
        return "adapter"
    name = parts[1] if len(parts) > 1 else "__init__"
    for group, names in (
        ("vocabulary", VOCABULARY),
        ("stage", STAGES),
        ("support", SUPPORT),
        ("root", ROOT),
        ("entry", ENTRY_POINTS),
    ):
        if name in names:
            return group
    return "unplaced"


def imports(path: Path) -> Iterator[tuple[str, bool, bool]]:
    """(module imported, only for type checking, at module level) for each import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only.update(id(n) for child in node.body for n in ast.walk(child))
    top_level = {id(n) for stmt in tree.body for n in ast.walk(stmt)} - {
        id(n)
        for stmt in tree.body
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for n in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from recon_stream.adapters import kafka` imports the submodule.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            yield name, id(node) in typing_only, id(node) in top_level


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


MODULES = package_modules()


def own(name: str) -> str | None:
    """The package module `name` refers to, if any."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(m for m in MODULES if layer(m) == "unplaced")
    assert unplaced == [], "place these in a layer in tests/unit/test_layers.py"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    kind = layer(module)
    wrong = []
    for name, typing_only, _ in imports(MODULES[module]):
        target = own(name) if name.startswith("recon_stream") else None
        other = layer(target) if target else None
        root = name.split(".")[0]
        if kind == "domain":
            if root in IO_LIBRARIES or (other is not None and other != "domain"):
                wrong.append(name)
        elif kind == "vocabulary":
            if other not in (None, "domain", "vocabulary") and not (
                other == "adapter" and typing_only
            ):
                wrong.append(name)
        elif kind == "adapter":
            if other in ("stage", "root", "entry"):
                wrong.append(name)
        elif kind == "stage":
            if (other == "adapter" and not typing_only) or other in ("root", "entry"):
                wrong.append(name)
        elif kind == "support":
            if other in ("stage", "root", "entry") or (other == "adapter" and not typing_only):
                wrong.append(name)
        elif kind == "root" and other == "entry":
            wrong.append(name)
    assert wrong == [], f"{module} ({kind}) must not import {wrong}"


def test_no_import_loops() -> None:
    graph: dict[str, set[str]] = {
        module: {
            target
            for name, typing_only, top in imports(path)
            if top
            and not typing_only
            and (target := own(name)) not in (None, module)
            # A package's own __init__ is imported by all its modules; it is no edge back.
            and not module.startswith(f"{target}.")
        }
        for module, path in MODULES.items()
    }
    loops: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                loops.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert loops == []


def test_the_check_sees_a_wrong_import(tmp_path: Path) -> None:
    # The rules above are only worth something if they catch a violation.
    assert layer("recon_stream.domain.risk") == "domain"
    assert layer("recon_stream.adapters.kafka") == "adapter"
    assert layer("recon_stream.scanner") == "stage"
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "from recon_stream.adapters.kafka import build_broker\n"
        "if TYPE_CHECKING:\n"
        "    from recon_stream.adapters.scan_queue import QueueItem\n"
        "def later():\n"
        "    import recon_stream.app\n"
    )
    found = {name: (typing_only, top) for name, typing_only, top in imports(sample)}
    assert found["recon_stream.adapters.kafka"] == (False, True)
    assert found["recon_stream.adapters.scan_queue.QueueItem"] == (True, True)
    assert found["recon_stream.app"] == (False, False)
