"""A 3-node JetStream cluster (every stream, bucket and object store at 3 replicas, on loopback) loses
the job stream's leader while jobs flow through a gateway process and two simulated workers: the
bounded version of `bench/failover.py`. Submits met during the election are refused with 503 and
Retry-After (and sent again with their Idempotency-Key), none gets a 500 or no answer, jobs complete
again once a new leader is elected, and every job ends done exactly once: none lost, none doubled.
Submits refused without an Idempotency-Key leave no record the API shows, and never run. And a nak
sent while the workers' consumer has no leader is not lost with it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nats
import pytest

from gpu_worker.naks import Naks
from imagegen.embedded_nats import EmbeddedCluster
from schemas import names
from schemas.jetstream import Topology
from schemas.names import Tier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from failover import FailoverSettings, execute, jetstream_ready, table  # noqa: E402

pytestmark = pytest.mark.processes  # each test starts a nats-server cluster of its own


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
    assert result["visible_records_of_refused_submits"] == 0 and result["runs_of_refused_submits"] == 0


async def test_a_nak_sent_while_the_consumer_has_no_leader_brings_the_job_back_before_the_ack_wait(tmp_path):
    """The try a worker gives back (nak, retry in 0.1 s) at the moment the workers' consumer lost its
    leader: a plain nak would be lost with it, and the job would come back only after the ack wait.
    Sent again until the new leader answers, it brings the job back well before."""
    ack_wait_s = 60.0
    cluster = EmbeddedCluster(store_dir=tmp_path / "nats").start()
    nc = None
    try:
        await jetstream_ready(cluster.url, Topology(replicas=3, ack_wait_s=ack_wait_s))
        nc = await nats.connect(cluster.url.split(","), max_reconnect_attempts=-1, reconnect_time_wait=0.1)
        js = nc.jetstream(timeout=2)
        await js.publish(Tier.NORMAL.subject, b"a job", headers={names.MSG_ID_HEADER: "nak-under-election"})
        consumer = names.jobs_consumer(Tier.NORMAL)
        pull = await js.pull_subscribe_bind(consumer, names.JOBS_STREAM)
        [msg] = await pull.fetch(1, timeout=10)
        naks = Naks(nc, ack_wait_s=ack_wait_s)
        await naks.start()

        cluster.kill((await js.consumer_info(names.JOBS_STREAM, consumer)).cluster.leader)
        await naks.nak(msg, 0.1, tag="job nak-under-election try 1")
        assert msg.reply in naks.pending  # no leader to answer it: kept, and sent again

        again = None
        deadline = asyncio.get_running_loop().time() + ack_wait_s * 0.6  # well within the ack wait
        while again is None and asyncio.get_running_loop().time() < deadline:
            try:
                [again] = await pull.fetch(1, timeout=1)
            except Exception as exc:  # no message yet, or no leader yet
                await asyncio.sleep(0.2)
        assert again is not None, "the job did not come back before the ack wait"
        assert again.data == b"a job" and again.metadata.num_delivered == 2
        assert not naks.pending
        await naks.close()
    finally:
        if nc is not None:
            await nc.close()
        cluster.stop()
