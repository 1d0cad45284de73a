"""The soak's checks can fail: each fault a soak must catch is planted in what the broker and the
workers' logs hold after a run, and the soak's verdict names it. A clean run passes. And the checks
read a real broker's records: an image written over a done job's fails the run."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import nats
import pytest

from imagegen.embedded_nats import free_port
from schemas import names
from schemas.status import ImageRef, JobState, JobStatus
from tests.helpers.real_processes import submit, wait_state

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from soak import Chaos, Observed, SoakSettings, Submitted, figures, observe, problems, read_statuses, runs_logged  # noqa: E402

IDS = ["job-aaaaaaaa", "job-bbbbbbbb", "job-cccccccc"]


def clean() -> tuple[list[Submitted], Observed]:
    jobs = [Submitted(n=n, key=f"k{n}", submitted_at=100.0, job_id=job_id, tries=1) for n, job_id in enumerate(IDS)]
    statuses = {
        job_id: JobStatus(
            job_id=job_id, state=JobState.DONE, attempt=1, submitted_at=100.0, finished_at=101.0,
            image=ImageRef(name=job_id, content_type="image/jpeg", size=500, width=64, height=64, chunks_id=f"nuid-{job_id}"),
        )
        for job_id in IDS
    }
    seen = Observed(
        statuses=statuses,
        descriptions={job_id: (f"nuid-{job_id}", 500) for job_id in IDS},
        done_events={job_id: [f"nuid-{job_id}"] for job_id in IDS},
        started_events=Counter(IDS),
        runs=Counter(IDS),
        every_key=set(IDS),
        chunk_sets={f"nuid-{job_id}" for job_id in IDS},
    )
    return jobs, seen


def verdict(jobs: list[Submitted], seen: Observed) -> tuple[dict, list[str]]:
    result = figures(SoakSettings(jobs=len(jobs)), jobs, seen, Chaos(), submitted_s=1.0, finished_s=2.0)
    return result, problems(result)


def test_a_clean_run_passes():
    result, found = verdict(*clean())
    assert found == []
    assert result["done_with_one_image"] == 3 and result["extra_runs"] == 0


def test_a_second_image_written_over_the_first_fails_the_run():
    jobs, seen = clean()
    seen.descriptions[IDS[0]] = ("nuid-second-run", 500)  # same name, same size: only the chunks differ
    seen.chunk_sets.add("nuid-second-run")
    result, found = verdict(jobs, seen)
    assert result["duplicates"] == 1 and result["duplicate_ids"] == [IDS[0]]
    assert any("doubled" in line and IDS[0] in line for line in found)


def test_two_done_events_fail_the_run():
    jobs, seen = clean()
    seen.done_events[IDS[1]].append("nuid-other")
    _, found = verdict(jobs, seen)
    assert any("doubled" in line and IDS[1] in line for line in found)


def test_a_done_job_without_its_done_event_fails_the_run():
    jobs, seen = clean()
    del seen.done_events[IDS[2]]
    result, found = verdict(jobs, seen)
    assert result["done_without_event_ids"] == [IDS[2]]
    assert any("`done` event is missing" in line for line in found)


@pytest.mark.parametrize("fault", ["no image in the record", "nothing stored", "another size stored"])
def test_a_done_job_without_its_image_fails_the_run(fault):
    jobs, seen = clean()
    if fault == "no image in the record":
        seen.statuses[IDS[0]].image = None
    elif fault == "nothing stored":
        del seen.descriptions[IDS[0]]
    else:
        seen.descriptions[IDS[0]] = (f"nuid-{IDS[0]}", 499)
    result, found = verdict(jobs, seen)
    assert result["done_without_image_ids"] == [IDS[0]]
    assert any("without their image" in line for line in found)


def test_a_failed_job_fails_the_run():
    jobs, seen = clean()
    status = seen.statuses[IDS[1]]
    status.state, status.image, status.error = JobState.FAILED, None, "crashed 5 times"
    result, found = verdict(jobs, seen)
    assert result["not_done_ids"] == [IDS[1]] and result["states"] == {"done": 2, "failed": 1}
    assert any("final but not done" in line for line in found)


def test_a_lost_job_and_a_stray_record_fail_the_run():
    jobs, seen = clean()
    seen.statuses[IDS[0]].state = JobState.RUNNING
    seen.every_key.add("job-nobody-asked")
    result, found = verdict(jobs, seen)
    assert result["lost"] == 1 and "job-nobody-asked" in result["duplicate_ids"]
    assert any("lost" in line for line in found) and any("doubled" in line for line in found)


def test_runs_are_counted_from_the_workers_logs_when_their_started_events_were_lost():
    jobs, seen = clean()
    logs = [
        f"2026-01-01 INFO imagegen.worker job {IDS[0]} try 1 running\n",
        f"2026-01-01 INFO imagegen.worker job {IDS[0]} try 1 running\njob {IDS[1]} try 1 running\njob {IDS[2]} try 1 running\n",
    ]  # a broker that forgot a delivery: two runs of try 1, one `started` event stored
    seen.runs = runs_logged(logs)
    result, found = verdict(jobs, seen)
    assert result["runs"] == 4 and result["extra_runs"] == 1 and result["started_events_missing"] == 1
    assert found == []  # a job may run twice; it is counted, not failed


async def test_an_image_written_over_a_done_jobs_image_on_a_real_broker_fails_the_run(broker, parts, http):
    """The same checks on what a real broker and worker hold: two jobs done, then a second image put
    under one's name (as a second run that ignored the first's `done` would): the run fails naming it."""
    await parts.worker(broker.url, "--sim-step-s", "0.01", name="painter")
    port = free_port()
    await parts.gateway(broker.url, port)
    url = f"http://127.0.0.1:{port}"
    jobs = []
    for n in range(2):
        job_id = await submit(http, url, {"prompt": f"checked {n}", "width": 64, "height": 64, "steps": 2})
        assert (await wait_state(http, url, job_id, {"done", "failed"}))["state"] == "done"
        jobs.append(Submitted(n=n, key=f"k{n}", submitted_at=0.0, job_id=job_id, tries=1))
    nc = await nats.connect(broker.url)
    try:
        js = nc.jetstream()
        statuses = await read_statuses(js, [j.job_id for j in jobs])
        logs = [part.log() for part in parts.started if part.name == "painter"]
        assert problems(figures(SoakSettings(jobs=2), jobs, await observe(js, statuses, logs), Chaos(), submitted_s=1, finished_s=1)) == []

        overwritten = jobs[0].job_id
        images = await js.object_store(names.IMAGES_BUCKET)
        await images.put(overwritten, b"\xff" * statuses[overwritten].image.size)  # same name, same size
        result = figures(SoakSettings(jobs=2), jobs, await observe(js, statuses, logs), Chaos(), submitted_s=1, finished_s=1)
    finally:
        await nc.close()
    assert result["duplicate_ids"] == [overwritten] and result["runs"] == 2
    assert any("doubled" in line and overwritten in line for line in problems(result))
