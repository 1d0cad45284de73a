"""The compiled engine on tiny-sdxl: every sampler runs the graph compiled at warm-up, with no recompile
and no eager fall-back, through the base and the refiner.

Dynamo traces with its "eager" backend here: the same guards and graphs Inductor would be handed, in
seconds on a CPU (Inductor's code generation would take minutes for no more proof). Proof comes from
Dynamo's own counters and from its `fail_on_recompile` stance, which raises where a guard fails.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from gpu_worker.engine import GenerationTask
from gpu_worker.schedulers import SCHEDULER_SPECS
from gpu_worker.sdxl import SdxlEngine, SdxlSettings
from gpu_worker.speedups import is_compiled
from gpu_worker.tiny_sdxl import build_tiny_refiner, build_tiny_sdxl

TASK = GenerationTask(
    job_id="compiled", prompt="a lighthouse", negative_prompt="", width=64, height=64, steps=4, guidance=5.0, seed=3
)


@pytest.fixture(scope="module")
def compiled_engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile-models")
    torch._dynamo.reset()
    counters.clear()
    engine = SdxlEngine.load(SdxlSettings(
        model=str(build_tiny_sdxl(root / "tiny-sdxl")),
        refiner=str(build_tiny_refiner(root / "tiny-sdxl-refiner")),
        compile="on",
        compile_backend="eager",
        compile_buckets="64x64",
        default_steps=4,
    ))
    warm_up = {name: dict(values) for name, values in counters.items()}
    yield engine, warm_up
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def test_warm_up_traces_each_unet_whole(compiled_engine):
    engine, warm_up = compiled_engine
    assert is_compiled(engine._base.unet) and is_compiled(engine._refiner.unet)
    assert warm_up["stats"]["unique_graphs"] == 2, warm_up  # base and refiner, one graph each
    assert not warm_up.get("graph_break"), warm_up["graph_break"]


@pytest.mark.parametrize("use_refiner", [False, True], ids=["base", "base+refiner"])
def test_every_sampler_runs_the_compiled_graph_without_recompiling(compiled_engine, use_refiner):
    engine, _ = compiled_engine
    torch.compiler.set_stance("fail_on_recompile")  # a failed guard raises instead of running eagerly
    try:
        for scheduler in SCHEDULER_SPECS:
            counters.clear()
            task = dataclasses.replace(TASK, scheduler=scheduler, use_refiner=use_refiner, refiner_split=0.5)
            engine.generate(task, lambda *_: None)
            assert not counters["frames"], (scheduler, dict(counters["frames"]))  # nothing traced anew
            assert not counters["recompiles"], (scheduler, dict(counters["recompiles"]))
    finally:
        torch.compiler.set_stance("eager_on_recompile")
