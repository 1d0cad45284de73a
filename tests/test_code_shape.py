"""The gateway's rooms stay apart and small: no API imports another API, the protocol-neutral core
imports none, and the core's modules and the worker's steps stay readable in size (read from the
source with `ast`, nothing run)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APIS = ROOT / "gateway" / "apis"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def api_of(module: str) -> str | None:
    """The API a dotted module name belongs to: gateway.apis.<api>..., else None."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["gateway", "apis"] else None


def long_functions(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_no_api_imports_another_api():
    crossings = []
    for path in APIS.rglob("*.py"):
        own = path.relative_to(APIS).parts[0].removesuffix(".py")
        for module in imported_modules(path):
            other = api_of(module)
            if other is not None and other.removesuffix(".py") != own:
                crossings.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not crossings, crossings


def test_the_core_state_and_http_rooms_import_no_api():
    crossings = [
        f"{path.relative_to(ROOT)} imports {module}"
        for room in ("core", "state", "http")
        for path in (ROOT / "gateway" / room).rglob("*.py")
        for module in imported_modules(path)
        if api_of(module) is not None
    ]
    assert not crossings, crossings


def test_core_modules_and_the_workers_steps_stay_small():
    core = sorted((ROOT / "gateway" / "core").glob("*.py"))
    big = [f"{p.relative_to(ROOT)} ({len(p.read_text().splitlines())} lines)" for p in core if len(p.read_text().splitlines()) > MAX_MODULE_LINES]
    assert not big, big
    steps = ("worker", "admit", "start", "finish", "generation", "progress", "outcomes", "registry")
    checked = [*core, *(ROOT / "gpu_worker" / f"{name}.py" for name in steps)]
    long = [line for path in checked for line in long_functions(path)]
    assert not long, long
