"""Every benchmark refuses a bad argument with exit code 2 and a message naming it, before it starts
anything (no traceback, no silent fallback to a default)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.processes  # each test runs a benchmark script

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("script", "args", "named"),
    [
        ("gpu.py", ["--sizes", "512,big"], "'512,big' is not a comma-separated list"),
        ("gpu.py", ["--size", "100"], "multiples of 8, got 100"),
        ("gpu.py", ["--steps", "0"], "--steps: must be at least 1"),
        ("gpu.py", ["--setups", "engine,warp"], "--setups: warp"),
        ("eta.py", ["--levels", "1,x"], "'1,x' is not a comma-separated list"),
        ("eta.py", ["--fairness", "0"], "--fairness: must be at least 1, got 0"),
        ("eta.py", ["--runs", "0"], "--runs: must be at least 1, got 0"),
        ("eta_sim.py", ["--futures", "0"], "--futures: must be at least 1, got 0"),
        ("eta_sim.py", ["--load", "1.2"], "--load: must be below 1"),
        ("eta_sim.py", ["--seeds", "0"], "--seeds: must be at least 1, got 0"),
        ("scale.py", ["--levels", "0,8"], "every count must be at least 1"),
        ("overhead.py", ["--jobs", "0"], "--jobs: must be at least 1, got 0"),
        ("overhead_ab.py", [".", ".", "--rounds", "5"], "--rounds: must be at least 10, got 5"),
        ("overhead_ab.py", [".", "no-such-checkout"], "after: 'no-such-checkout' is not a checkout"),
        ("gateway_load.py", ["--duration", "inf"], "--duration: must be a finite number"),
        ("soak.py", ["--rate", "0"], "--rate: must be above 0"),
        ("failover.py", ["--jobs", "0"], "--jobs: must be at least 1, got 0"),
        ("failover.py", ["--down-s", "-1"], "--down-s: must be above 0"),
        ("memory.py", ["--sockets", "many"], "--sockets: 'many' is not a whole number"),
        ("cpu_profile.py", ["--rate", "0"], "--rate: must be at least 1, got 0"),
        ("webhooks.py", ["--rate", "0"], "--rate: must be above 0"),
        ("webhooks.py", ["--jobs", "x"], "--jobs: 'x' is not a whole number"),
        ("event_loops.py", ["--rounds", "0"], "--rounds: must be at least 1, got 0"),
    ],
)
def test_benchmarks_refuse_bad_arguments_by_name(script, args, named):
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 2 and named in done.stderr, done.stderr[-2000:]


def test_gpu_benchmark_writes_every_finished_row_before_the_next(tmp_path):
    """A run killed part-way (a GPU window's time limit) leaves its JSON and Markdown with every row it
    finished: tiny-sdxl on the CPU, killed as soon as the first row is written."""
    import json
    import os
    import time

    out, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "2", "--setups", "diffusers,engine,tutorial",
         "--work-dir", str(tmp_path / "work"), "--json", str(out), "--markdown", str(table)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env,
    )
    rows: list = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and run.poll() is None:
            if out.exists():
                rows = json.loads(out.read_text())["results"]  # replaced whole: never half a file
                if rows:
                    break
            time.sleep(0.02)
        still_running = run.poll() is None
    finally:
        run.kill()
        run.wait(timeout=30)
    assert rows and still_running, "no row written while the benchmark ran"
    kept = json.loads(out.read_text())
    assert kept["results"][0]["setup"] == "diffusers" and kept["results"][0]["seconds_per_image"] > 0
    assert kept["torch"] and kept["diffusers"] and kept["peak_tflops"] > 0
    assert "| diffusers | 64x64 |" in table.read_text()
