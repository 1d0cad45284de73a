"""A 3-node JetStream cluster (every stream, bucket and object store at 3 replicas, on loopback) loses
the job stream's leader while jobs flow through a gateway process and two simulated workers: the
bounded version of `bench/failover.py`. Submits met during the election are refused with 503 and
Retry-After (and sent again with their Idempotency-Key), none gets a 500 or no answer, jobs complete
again once a new leader is elected, and every job ends done exactly once: none lost, none doubled."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from failover import FailoverSettings, execute, table  # noqa: E402


async def test_killing_the_job_stream_leader_loses_and_doubles_no_job(tmp_path):
    settings = FailoverSettings(
        jobs=60, rate=10, workers=2, gateways=1, step_s=0.01, ack_wait_s=10, first_kill_s=1.5, down_s=3.0,
        worker_kill_s=None, second_kill_s=None, drain_timeout_s=60,
    )
    result = await execute(settings, tmp_path)
    print(table(result))

    assert result["submitted"] == 60 and result["states"] == {"done": 60}
    assert result["lost"] == 0
    assert result["duplicated"] == 0, result["duplicated_ids"]
    assert result["http_500s"] == 0
    [kill] = result["kills"]
    assert kill["refused_submits"] >= 1  # the election was felt by the clients
    assert kill["refused_without_retry_after"] == 0 and kill["no_answer"] == 0
    assert kill["done_after_election"] >= 1
