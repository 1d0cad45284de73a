"""tiny-sdxl's speed on one CPU thread: the worker's SDXL engine making one image (default 1024x1024,
4 steps, guidance 5, as `imagegen generate` asks without flags), timed image by image.

    python bench/tiny_sdxl.py [--size 1024] [--steps 4] [--repeats 5]

Prints a markdown table (wall and CPU seconds per image: best and median; the load average, since these
shared machines' other work slows a run) and writes bench/results/tiny_sdxl.json. The CPU time is the
process's own, so it moves less than the wall time when other processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024, help="square image side in pixels (default 1024)")
    p.add_argument("--steps", type=int, default=4, help="denoising steps (default 4, tiny-sdxl's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed images after one warm-up (default 5)")
    p.add_argument("--json", type=Path, default=RESULTS / "tiny_sdxl.json", help="where to write the results")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from gpu_worker.engines.base import GenerationTask
    from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings
    from gpu_worker.engines.tiny_sdxl import build_tiny_sdxl

    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        folder = build_tiny_sdxl(Path(work) / "tiny-sdxl")
        engine = SdxlEngine.load(SdxlSettings(model=str(folder), device="cpu", threads=1, default_steps=args.steps))
        load_s = time.perf_counter() - started
        task = GenerationTask(
            job_id="bench", prompt="a lighthouse at dusk", negative_prompt="", width=args.size, height=args.size,
            steps=args.steps, guidance=5.0, seed=1,
        )
        engine.generate(task, lambda *_: None)  # warm-up
        walls, cpus = [], []
        for i in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            image = engine.generate(task, lambda *_: None)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            assert image.size == (args.size, args.size), image.size
    result = {
        "size": args.size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "build_and_load_s": round(load_s, 3),
        "wall_s": [round(s, 3) for s in walls],
        "cpu_s": [round(s, 3) for s in cpus],
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"tiny-sdxl, {args.size}x{args.size}, {args.steps} steps, 1 torch thread, {args.repeats} images "
          f"(load average {result['load_average']:.1f} on {result['cpus']} cores)\n")
    print("| per image | best | median |\n| --- | --- | --- |")
    print(f"| wall s | {min(walls):.2f} | {statistics.median(walls):.2f} |")
    print(f"| CPU s | {min(cpus):.2f} | {statistics.median(cpus):.2f} |")
    print(f"\nbuild and load: {load_s:.1f} s")


if __name__ == "__main__":
    main()
