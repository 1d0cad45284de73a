"""The house's floors, checked on the source: `schemas/` at the bottom, `gateway/` and `gpu_worker/` side
by side in the middle, `imagegen/` (CLI, client) on top. Every import of every module is read with `ast`
(those inside functions too), and a step the wrong way is reported by file and line.

The gateway, `schemas` and the Python client install without the `[worker]` extra, so importing them must
not load torch; `imagegen worker` must not load the gateway. Both are checked in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("schemas", "gateway", "gpu_worker", "imagegen")
FORBIDDEN = {  # package -> the packages it must never import
    "schemas": {"gateway", "gpu_worker", "imagegen"},
    "gateway": {"gpu_worker", "imagegen"},
    "gpu_worker": {"gateway", "imagegen"},
    "imagegen": set(),
}
APIS = ("native", "mflux", "openai", "a1111", "comfy")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


@dataclass(frozen=True)
class Import:
    file: Path
    line: int
    module: str  # dotted, absolute

    def __str__(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line} imports {self.module}"


def modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    here = dotted(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(path, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the module's package
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            for alias in node.names:  # `from gateway import jobs` imports the module gateway.jobs
                sub = f"{name}.{alias.name}"
                found.append(Import(path, node.lineno, sub if is_module(sub) else name))
    return sorted(set(found), key=lambda i: (i.line, i.module))


def is_module(name: str) -> bool:
    where = ROOT.joinpath(*name.split("."))
    return where.with_suffix(".py").is_file() or (where / "__init__.py").is_file()


def top(module: str) -> str:
    return module.split(".")[0]


def floor_violations() -> list[str]:
    out = set()
    for path in modules():
        owner = top(dotted(path))
        for imp in imports_of(path):
            if top(imp.module) in FORBIDDEN[owner]:
                out.add(f"{imp.file.relative_to(ROOT)}:{imp.line} imports {top(imp.module)} ({imp.module})")
    return sorted(out)


def test_the_floors_hold():
    violations = floor_violations()
    assert not violations, "imports against the floors:\n" + "\n".join(violations)


def test_the_checker_sees_a_step_the_wrong_way(tmp_path, monkeypatch):
    """The checker itself: a schemas module importing the gateway, lazily, is reported by file and line."""
    fake_root = tmp_path
    for package in PACKAGES:
        (fake_root / package).mkdir()
        (fake_root / package / "__init__.py").write_text("")
    (fake_root / "schemas" / "bad.py").write_text("import json\n\n\ndef f():\n    from gateway.app import create_app\n")
    (fake_root / "gateway" / "jobs.py").write_text("")
    (fake_root / "gateway" / "rel.py").write_text("from . import jobs\nfrom .settings import GatewaySettings\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    assert floor_violations() == ["schemas/bad.py:5 imports gateway (gateway.app)"]
    assert {i.module for i in imports_of(fake_root / "gateway" / "rel.py")} >= {"gateway.jobs", "gateway.settings"}


def test_tests_share_through_helpers_only():
    """A test module imports what it shares from tests/helpers, never from another test module or conftest."""
    wrong = sorted(
        f"{imp.file.relative_to(ROOT)}:{imp.line} imports {imp.module}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        for imp in imports_of(path)
        if top(imp.module) == "tests" and not imp.module.startswith("tests.helpers")
    )
    assert not wrong, "imports of test modules (move what is shared to tests/helpers):\n" + "\n".join(wrong)


def loaded_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_gateway_schemas_and_client_load_without_torch():
    loaded = loaded_after("import gateway.app, schemas, imagegen.client")
    assert {"gateway.app", "schemas", "imagegen.client"} <= loaded
    heavy = sorted(m for m in loaded if top(m) in {"torch", "diffusers", "transformers", "peft", "accelerate"})
    assert not heavy, f"importing the gateway, schemas or the client loads {heavy[:5]}"


def test_the_worker_command_loads_no_gateway_module():
    """`imagegen worker` up to the point where it starts its event loop (which is replaced here)."""
    loaded = loaded_after(
        "from imagegen import cli, event_loop\n"
        "ran = []\n"
        "event_loop.run = lambda coro, loop=None: (ran.append(1), coro.close())\n"
        "cli.main(['worker', '--model', 'simulated', '--nats', 'nats://127.0.0.1:1'])\n"
        "assert ran, 'the worker command did not reach its event loop'\n"
    )
    assert "imagegen.runtime" in loaded and "gpu_worker.settings" in loaded
    gateway = sorted(m for m in loaded if top(m) == "gateway")
    assert not gateway, f"imagegen worker loads {gateway}"


def test_a_worker_without_the_worker_extra_says_what_to_install():
    """As on a gateway's install: torch, diffusers and transformers cannot be imported."""
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "from imagegen import cli\n"
        "cli.main(['worker', '--model', 'tiny-sdxl', '--nats', 'nats://127.0.0.1:1'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs torch, diffusers, transformers: pip install 'imagegen[worker]'" in done.stderr


# ---- sizes: no module over 500 lines, no function over 80, no API importing another ---------------------


def api_of(module: str) -> str | None:
    """Which API a gateway module belongs to: gateway/apis/<api>... or, flat, gateway/<api>_*.py."""
    parts = module.split(".")
    if parts[0] != "gateway" or len(parts) < 2:
        return None
    if parts[1] == "apis" and len(parts) > 2:
        return parts[2]
    return next((api for api in APIS if parts[1] == api or parts[1].startswith(f"{api}_")), None)


def size_offenders() -> list[str]:
    out = []
    for path in modules():
        name = path.relative_to(ROOT)
        text = path.read_text()
        lines = text.count("\n")
        if lines > MAX_MODULE_LINES:
            out.append(f"{name}: {lines} lines (most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}:{node.lineno} {node.name}() is {length} lines (most {MAX_FUNCTION_LINES})")
        mine = api_of(dotted(path))
        if mine:
            out += [f"{i.file.relative_to(ROOT)}:{i.line} ({mine}) imports {i.module} ({api_of(i.module)})"
                    for i in imports_of(path) if api_of(i.module) not in (None, mine)]
    return out


def test_sizes():
    offenders = size_offenders()
    print("\n".join(offenders))
    assert not offenders, f"{len(offenders)} over the limits:\n" + "\n".join(offenders)
