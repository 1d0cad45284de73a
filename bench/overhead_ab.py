"""Two checkouts' time added per job, compared job by job: the release before a change against the change.

`overhead.py` runs one checkout at a time; on a shared machine whose speed drifts from minute to minute,
two runs of it differ by more than most changes do. Here both checkouts run side by side, each its own
stack (an embedded nats-server, its gateway and one simulated worker of zero time, started from that
checkout's `bench/common.py` with the checkout first on PYTHONPATH), and the client sends one job to
each in turn, the order swapped every round, so the drift weighs on both alike. Each way of waiting
(`Prefer: wait`; `Prefer: wait` with the image as the answer) is timed as in `overhead.py`.

Reported per checkout: p50 and p99 of the time added per job, and the median of the paired differences
(B minus A, round by round) with a 95 % interval from resampling the rounds.

  git worktree add ../before <commit>
  python bench/overhead_ab.py ../before .          # about 1 minute on 2 cores

The results name each checkout by its commit (and whether its tree had changes), never by its folder.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import JOB_ERRORS, SMALL_JOB, http_session, markdown_table, run_job, summary_ms, whole, write_results  # noqa: E402

from imagegen.embedded_nats import EmbeddedNats, free_port  # noqa: E402

WAYS = {"prefer": "Prefer: wait", "image": "Prefer: wait, the image in the answer"}


@dataclass
class Checkout:
    """One checkout's stack: its nats-server and the processes started from its tree."""

    label: str
    tree: Path
    nats: EmbeddedNats
    procs: list[asyncio.subprocess.Process]
    url: str = ""

    async def start(self, role: str, *args: str) -> str:
        """`python <tree>/bench/common.py <role> ...` with the tree first on PYTHONPATH; its READY line's port."""
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        log = open(self.nats.store_dir.parent / f"{role}.log", "ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(self.tree / "bench" / "common.py"), role, "--nats", self.nats.url, *args,
            stdout=asyncio.subprocess.PIPE, stderr=log, cwd=str(self.tree), env=env,
        )
        log.close()
        self.procs.append(proc)
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().split()
        if not line or line[0] != "READY":
            raise RuntimeError(f"{self.label}: {role} did not start; see {self.nats.store_dir.parent / (role + '.log')}")
        return line[1] if len(line) > 1 else ""

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.terminate()
        await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for p in self.procs), return_exceptions=True)
        await self.nats.astop()


async def open_checkout(stack: AsyncExitStack, label: str, tree: Path) -> Checkout:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"imagegen-ab-{label}-")))
    nats = EmbeddedNats(store_dir=workdir / "nats", port=free_port())
    await asyncio.get_running_loop().run_in_executor(None, nats.start)
    checkout = Checkout(label=label, tree=tree, nats=nats, procs=[])
    stack.push_async_callback(checkout.stop)
    checkout.url = f"http://127.0.0.1:{await checkout.start('gateway')}"
    await checkout.start("workers", "--count", "1")
    return checkout


def revision(tree: Path) -> str:
    """The checkout's commit, with "+changes" when its tracked files differ from it."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)

    commit = git("rev-parse", "--short=12", "HEAD").stdout.strip() or "unknown"
    return commit + ("+changes" if git("diff", "--quiet", "HEAD").returncode == 1 else "")


def median_interval(values: list[float], *, draws: int = 2000, seed: int = 7) -> tuple[float, float, float]:
    """The median and its 95 % interval from resampling `values` (a bootstrap)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return statistics.median(values), medians[int(draws * 0.025)], medians[int(draws * 0.975)]


async def compare(a: Checkout, b: Checkout, rounds: int, warm_up: int) -> dict:
    times: dict[str, dict[str, list[float]]] = {way: {a.label: [], b.label: []} for way in WAYS}
    errors = 0
    async with http_session() as http:
        for i in range(warm_up + rounds):
            order = (a, b) if i % 2 == 0 else (b, a)
            for k, way in enumerate(WAYS):
                for checkout in order:
                    body = {**SMALL_JOB, "seed": (i * len(WAYS) + k) * 2 + (checkout is b), "cache": False}
                    try:
                        total = (await run_job(http, checkout.url, body, wait=way))["total"]
                    except JOB_ERRORS:
                        errors += 1
                        total = float("nan")
                    if i >= warm_up:
                        times[way][checkout.label].append(total)
    result: dict = {"rounds": rounds, "errors": errors, "ways": {}}
    for way, by in times.items():
        pairs = [(x, y) for x, y in zip(by[a.label], by[b.label]) if x == x and y == y]  # both ran
        diff = [(y - x) * 1000 for x, y in pairs]
        mid, low, high = median_interval(diff)
        result["ways"][way] = {
            a.label: summary_ms([x for x, _ in pairs]), b.label: summary_ms([y for _, y in pairs]),
            "b_minus_a_ms": {"median": round(mid, 3), "low95": round(low, 3), "high95": round(high, 3)},
        }
    return result


async def main(args: argparse.Namespace) -> None:
    trees = [Path(t).resolve() for t in (args.before, args.after)]
    async with AsyncExitStack() as stack:
        a = await open_checkout(stack, "A", trees[0])
        b = await open_checkout(stack, "B", trees[1])
        started = time.monotonic()
        result = await compare(a, b, args.rounds, args.warm_up)
    result |= {"before": revision(trees[0]), "after": revision(trees[1]), "seconds": round(time.monotonic() - started, 1)}
    rows = []
    for way, r in result["ways"].items():
        d = r["b_minus_a_ms"]
        rows.append([WAYS[way], f"{r['A']['p50_ms']:.2f} / {r['A']['p99_ms']:.2f}", f"{r['B']['p50_ms']:.2f} / {r['B']['p99_ms']:.2f}",
                     f"{d['median']:+.3f} ({d['low95']:+.3f} .. {d['high95']:+.3f})"])
    print(f"A: {trees[0]}\nB: {trees[1]}\n{result['rounds']} rounds, {result['errors']} errors\n")
    print(markdown_table(["way of waiting", "A p50 / p99 ms", "B p50 / p99 ms", "B - A, median ms (95 %)"], rows))
    print(f"results: {write_results('overhead_ab', result)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="the checkout to compare against (A)")
    parser.add_argument("after", help="the checkout with the change (B)")
    parser.add_argument("--rounds", type=whole(10), default=400, help="jobs per way of waiting and checkout")
    parser.add_argument("--warm-up", type=whole(0), default=20, help="rounds run first and not counted")
    args = parser.parse_args(argv)
    for name in ("before", "after"):
        if not (Path(getattr(args, name)) / "bench" / "common.py").is_file():
            parser.error(f"{name}: {getattr(args, name)!r} is not a checkout of this project (no bench/common.py)")
    return args


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
