"""Where the gateway's and a worker's CPU goes per job, from py-spy samples under the overhead load.

The stack of `overhead.py` (an embedded nats-server, the gateway and one simulated worker of zero time,
each in its own process) runs `--clients` clients, each looping submit -> WebSocket -> image, while
py-spy samples the gateway and the worker from outside (`--nonblocking`: the processes are not
paused). Each sample's innermost frame names what the process was doing (samples of a thread waiting
in epoll or on a lock are left out); the report splits each process's measured CPU time per job by
those samples: by package (with socket sends and receives apart from the rest of asyncio; a
send's share includes the moments the sender waits, ready to run, while the process it woke runs),
the busiest functions by their own time, and the share under each of the
service's own functions. The collapsed stacks are kept (in bench/results/cpu-profile-stacks/, not
committed) for a flame graph tool.

The stack runs on asyncio's own event loop (IMAGEGEN_EVENT_LOOP=asyncio), not on uvloop as deployed:
py-spy sees Python frames only, and inside uvloop's C loop it can tell neither a socket send from the
rest of the loop nor a process waiting in epoll from one at work.

  pip install -e '.[bench]'         # py-spy
  python bench/cpu_profile.py       # about 30 s on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import shutil
import sys
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, http_session, markdown_table, open_stack, positive, run_job, whole, write_results  # noqa: E402
from overhead import job_body, metered, throughput  # noqa: E402

OWN_PACKAGES = ("gateway", "gpu_worker", "schemas", "imagegen")
SOCKET_SEND = ("_SelectorSocketTransport.write", "_SelectorSocketTransport.writelines", "socket.send")
SOCKET_RECEIVE = ("_SelectorSocketTransport._read_ready__data_received", "_SelectorSocketTransport._read_ready__get_buffer")
# Frames where a thread waits: py-spy, looking from outside, may count a thread in these as running.
WAITING = {
    ("EpollSelector.select", "selectors.py"),
    ("_worker", "concurrent/futures/thread.py"),
    ("Condition.wait", "threading.py"),
    ("Event.wait", "threading.py"),
    ("Thread._wait_for_tstate_lock", "threading.py"),
}


def frame_parts(frame: str) -> tuple[str, str]:
    """`func (pkg/module.py:12)` -> (func, "pkg/module.py")."""
    func, _, where = frame.rpartition(" (")
    return func, where.rstrip(")").rpartition(":")[0]


def package(frame: str) -> str:
    """What a leaf frame's time counts as: a socket send or receive, or the frame's package."""
    func, path = frame_parts(frame)
    if func in SOCKET_SEND:
        return "socket send"
    if func in SOCKET_RECEIVE:
        return "socket receive"
    if not path:
        return "unknown"
    top = path.split("/")[0]
    return top.removesuffix(".py")


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def summarize(stacks: list[tuple[list[str], int]], *, cpu_ms_per_job: float, top: int) -> dict:
    """The process's measured CPU per job split by the busy samples: by package and by leaf function,
    and the share of busy samples under each of the service's own functions."""
    by_package: collections.Counter[str] = collections.Counter()
    by_leaf: collections.Counter[str] = collections.Counter()
    under_own: collections.Counter[str] = collections.Counter()
    total = waiting = 0
    for frames, n in stacks:
        if frame_parts(frames[-1]) in WAITING:
            waiting += n
            continue
        total += n
        by_package[package(frames[-1])] += n
        by_leaf[frames[-1]] += n
        for frame in set(frames):
            if frame_parts(frame)[1].startswith(OWN_PACKAGES):
                under_own[frame] += n
    per_sample_ms = cpu_ms_per_job / max(total, 1)
    return {
        "busy_samples": total,
        "waiting_samples": waiting,
        "cpu_ms_per_job": round(cpu_ms_per_job, 3),
        "by_package_ms_per_job": {k: round(v * per_sample_ms, 3) for k, v in by_package.most_common()},
        "top_self_ms_per_job": {k: round(v * per_sample_ms, 3) for k, v in by_leaf.most_common(top)},
        "top_own_share": {k: round(v / max(total, 1), 3) for k, v in under_own.most_common(top)},
    }


async def main(args: argparse.Namespace) -> int:
    spy = shutil.which("py-spy")
    if spy is None:
        print("cpu_profile.py: py-spy is not installed (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    os.environ["IMAGEGEN_EVENT_LOOP"] = "asyncio"  # the processes' loop: py-spy cannot see into uvloop's (see above)
    results: dict = {"config": vars(args), "processes": "nats-server, gateway process, one worker process, clients in the benchmark process"}
    stacks_dir = RESULTS / "cpu-profile-stacks"
    stacks_dir.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as es:
        stack = await open_stack(es)
        async with http_session() as http:
            await stack.start_workers(1, per_process=1)
            await asyncio.sleep(0.5)
            for i in range(50):  # warm-up: connections, consumers, caches
                await run_job(http, stack.url, job_body(i))
            targets = {"gateway": stack.gateway.pid, "worker": stack.workers[0].pid}
            spies = {
                name: await asyncio.create_subprocess_exec(
                    spy, "record", "--pid", str(pid), "--rate", str(args.rate), "--duration", str(math.ceil(args.duration) + 2),
                    "--nonblocking", "--format", "raw", "--output", str(stacks_dir / f"{name}.txt"),
                    stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
                )
                for name, pid in targets.items()
            }
            await asyncio.sleep(1.0)  # py-spy attaches
            results["load"] = load = await metered(
                targets, throughput(http, stack.url, clients=args.clients, duration_s=args.duration), lambda r: r["jobs"]
            )
            cores = load["cpu_cores"]
            for name, proc in spies.items():
                _, err = await asyncio.wait_for(proc.communicate(), 60)
                if proc.returncode != 0:
                    print(f"cpu_profile.py: py-spy on the {name} failed: {err.decode()[-500:]}", file=sys.stderr)
                    return 1
    jobs = load["jobs"]
    results["profiles"] = {
        name: summarize(read_collapsed(stacks_dir / f"{name}.txt"), cpu_ms_per_job=load["cpu_ms_per_job"][name], top=args.top)
        for name in ("gateway", "worker")
    }
    path = write_results("cpu_profile", results)

    print(f"{jobs} jobs at {load['jobs_per_s']} jobs/s with {args.clients} clients under py-spy ({args.rate} samples/s)\n")
    for name, prof in results["profiles"].items():
        print(f"{name}: {prof['cpu_ms_per_job']} CPU ms per job ({cores[name]:.2f} cores), split by {prof['busy_samples']} busy samples")
        print(markdown_table(["what", "CPU ms per job"], [[k, v] for k, v in list(prof["by_package_ms_per_job"].items())[:12]]))
        print()
        print(markdown_table(["busiest function (own time)", "CPU ms per job"], [[k, v] for k, v in list(prof["top_self_ms_per_job"].items())[:12]]))
        print()
        print(markdown_table(["service function (time under it)", "share"], [[k, f"{v:.0%}"] for k, v in list(prof["top_own_share"].items())[:16]]))
        print()
    print(f"collapsed stacks (for a flame graph): {stacks_dir}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=positive, default=20.0, help="seconds of load sampled")
    parser.add_argument("--clients", type=whole(1), default=32, help="concurrent clients")
    parser.add_argument("--rate", type=whole(1), default=100, help="py-spy samples per second")
    parser.add_argument("--top", type=whole(1), default=25, help="functions kept per list in the results")
    sys.exit(asyncio.run(main(parser.parse_args())))
