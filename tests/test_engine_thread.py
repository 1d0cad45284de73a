"""The engine's thread: the weights are loaded, warmed up and every job run on one thread the engine
owns (CUDA graphs recorded at warm-up replay only on the thread that recorded them)."""

from __future__ import annotations

import threading

from tests.helpers.service import wait_status


async def test_load_warm_up_and_every_job_run_on_the_engine_thread(service, http):
    engine = service.worker.engine
    for seed in (1, 2):
        body = {"prompt": "a lighthouse", "seed": seed, "width": 64, "height": 64, "steps": 2}
        async with http.post(f"{service.url}/api/generate", json=body) as r:
            assert r.status == 200, await r.text()
            task_id = (await r.json())["task_id"]
        assert (await wait_status(http, service.url, task_id, timeout=60))["status"] == "done"
    assert engine.loaded_on not in (0, threading.get_ident())  # not the event loop's thread
    assert engine.ran_on == {engine.loaded_on}  # the worker's warm-up and both jobs
    assert service.worker.gpu is engine.executor
    names = {t.ident: t.name for t in threading.enumerate()}
    assert names[engine.loaded_on].startswith("imagegen-engine")
