"""Every benchmark refuses a bad argument with exit code 2 and a message naming it, before it starts
anything (no traceback, no silent fallback to a default)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
