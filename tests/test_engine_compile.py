"""The compiled engine on tiny-sdxl: every sampler runs the graph compiled at warm-up, with no recompile
and no eager fall-back, through the base and the refiner.

Dynamo traces with its "eager" backend here: the same guards and graphs Inductor would be handed, in
seconds on a CPU (Inductor's code generation would take minutes for no more proof). Proof comes from
Dynamo's own counters and from its `fail_on_recompile` stance, which raises where a guard fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Dynamo's state (compiled code, counters, the compile stance) is global to an interpreter: the compiled
# engine runs in one of its own, so no other test inherits it, and reports what Dynamo counted as JSON.
COMPILED_ENGINE = """
import dataclasses, json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
torch.set_num_threads(1)
from gpu_worker.engines.base import GenerationTask
from gpu_worker.engines.schedulers import SCHEDULER_SPECS
from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings
from gpu_worker.engines.speedups import is_compiled
from gpu_worker.engines.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl

root = Path(sys.argv[1])
engine = SdxlEngine.load(SdxlSettings(
    model=str(build_tiny_sdxl(root / "tiny-sdxl")), refiner=str(build_tiny_refiner(root / "tiny-sdxl-refiner")),
    compile="on", compile_backend="eager", compile_buckets="64x64", max_batch=2, default_steps=4,
))
report = {"compiled": [is_compiled(engine._base.unet), is_compiled(engine._refiner.unet)],
          "warm_up": {name: dict(values) for name, values in counters.items()}, "runs": {}}
task = GenerationTask(job_id="compiled", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=4, guidance=5.0, seed=3)
torch.compiler.set_stance("fail_on_recompile")  # a failed guard raises instead of running eagerly
for use_refiner in (False, True):
    runs = report["runs"]["base+refiner" if use_refiner else "base"] = {}
    for scheduler in SCHEDULER_SPECS:
        counters.clear()
        engine.generate(dataclasses.replace(task, scheduler=scheduler, use_refiner=use_refiner, refiner_split=0.5), lambda *_: None)
        runs[scheduler] = {"frames": dict(counters["frames"]), "recompiles": dict(counters["recompiles"])}
    counters.clear()
    pair = [dataclasses.replace(task, seed=seed, use_refiner=use_refiner, refiner_split=0.5) for seed in (1, 2)]
    engine.generate_batch(pair, [lambda *_: None] * 2)  # --max-batch 2: the batch of two was compiled too
    runs["batch of two"] = {"frames": dict(counters["frames"]), "recompiles": dict(counters["recompiles"])}
print(json.dumps(report))
"""

pytestmark = [pytest.mark.slow, pytest.mark.processes]  # Dynamo traces both UNets at warm-up: about 10 s on a CPU


@pytest.fixture(scope="module")
def compiled_engine(tmp_path_factory) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILED_ENGINE, str(tmp_path_factory.mktemp("compile-models"))],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_warm_up_traces_each_unet_whole(compiled_engine):
    warm_up = compiled_engine["warm_up"]
    assert compiled_engine["compiled"] == [True, True]
    assert warm_up["stats"]["unique_graphs"] == 4, warm_up  # base and refiner, one graph per batch size each
    assert not warm_up.get("graph_break"), warm_up["graph_break"]


@pytest.mark.parametrize("use_refiner", [False, True], ids=["base", "base+refiner"])
def test_every_sampler_runs_the_compiled_graph_without_recompiling(compiled_engine, use_refiner):
    from gpu_worker.engines.schedulers import SCHEDULER_SPECS

    runs = compiled_engine["runs"]["base+refiner" if use_refiner else "base"]
    assert set(runs) == {*SCHEDULER_SPECS, "batch of two"}
    for name, counted in runs.items():
        assert not counted["frames"], (name, counted["frames"])  # nothing traced anew
        assert not counted["recompiles"], (name, counted["recompiles"])


RESTART = """
import sys, torch, torch._dynamo
torch.set_num_threads(1)
from gpu_worker.engines.speedups import cache_counts, use_compile_cache
folder = use_compile_cache(sys.argv[1])
layer = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).eval()
for start in range(2):  # a start, then a restart: Dynamo's in-memory state is dropped in between
    torch._dynamo.reset()
    with torch.inference_mode():
        torch.compile(layer, dynamic=False)(torch.ones(2, 8))
    print(folder, *cache_counts())
"""


def test_compile_cache_folder_is_reused_by_the_next_start(tmp_path):
    """Inductor's compiled graph lands in the cache folder, and compiling it again loads it from there
    (compiled in a process of its own, twice)."""
    root = ROOT
    folder = tmp_path / "compile-cache"
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", RESTART, str(folder)], capture_output=True, text=True, timeout=240, env=env, cwd=root
    )
    assert done.returncode == 0, done.stderr[-2000:]
    first, restart = (line.split() for line in done.stdout.splitlines()[-2:])
    assert first == [str(folder), "0", "1"] and restart == [str(folder), "1", "1"], done.stdout
    assert any((folder / "fxgraph").rglob("*")), "nothing written under the cache folder"
