"""Structured logs: `--log-format json` writes one JSON object per line, and every line logged while a
worker handles a job (on the event loop or in its GPU thread) carries the job's id and try number."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from gpu_worker.job_context import ContextThreadPool, JobContext, current_job
from imagegen import logs
from imagegen.cli import build_parser
from tests.helpers.service import wait_status


def json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def log_to(stream: io.StringIO, log_format: str = "json") -> logging.Logger:
    logger = logging.getLogger("imagegen.test-logs")
    logger.handlers[:] = [logs.log_handler(log_format, stream)]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_a_json_line_has_the_fields_and_those_passed_with_extra():
    stream = io.StringIO()
    logger = log_to(stream)
    logger.info("job %s done in %.2fs", "abc123", 1.5, extra={"job_id": "abc123", "attempt": 2, "duration_s": 1.23456})
    logger.warning('a "quoted"\nmessage')
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logger.exception("crashed")
    first, second, third = json_lines(stream)
    assert first["msg"] == "job abc123 done in 1.50s" and first["level"] == "INFO" and first["logger"] == "imagegen.test-logs"
    assert (first["job_id"], first["attempt"], first["duration_s"]) == ("abc123", 2, 1.2346)
    assert first["ts"].endswith("Z")
    assert second["msg"] == 'a "quoted"\nmessage' and "job_id" not in second
    assert third["level"] == "ERROR" and "RuntimeError: boom" in third["exc"]


def test_the_job_in_hand_labels_lines_also_in_the_gpu_thread():
    stream = io.StringIO()
    logger = log_to(stream)
    pool = ContextThreadPool(max_workers=1)
    token = current_job.set(JobContext(job_id="job-in-hand", attempt=3))
    try:
        logger.info("on the loop")
        pool.submit(logger.info, "in the GPU thread").result(timeout=10)
        logger.info("own id wins", extra={"job_id": "other"})
    finally:
        current_job.reset(token)
        pool.shutdown()
    logger.info("after the job")
    loop_line, thread_line, own, after = json_lines(stream)
    assert (loop_line["job_id"], loop_line["attempt"]) == ("job-in-hand", 3)
    assert (thread_line["job_id"], thread_line["attempt"]) == ("job-in-hand", 3)
    assert own["job_id"] == "other"
    assert "job_id" not in after and "attempt" not in after


def test_text_format_stays_one_plain_line():
    stream = io.StringIO()
    log_to(stream, "text").info("job %s queued", "abc")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("INFO imagegen.test-logs job abc queued")


def test_log_format_flag_and_variable(monkeypatch, capsys):
    assert build_parser().parse_args(["gateway"]).log_format == "text"
    assert build_parser().parse_args(["worker", "--log-format", "json"]).log_format == "json"
    monkeypatch.setenv("IMAGEGEN_LOG_FORMAT", "json")
    assert build_parser().parse_args(["up"]).log_format == "json"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["gateway", "--log-format", "xml"])
    assert exc.value.code == 2
    assert "--log-format" in capsys.readouterr().err
    with pytest.raises(ValueError, match="xml"):
        logs.log_handler("xml")


async def test_lines_logged_while_a_worker_handles_a_job_carry_its_id(service, http, caplog):
    caplog.set_level(logging.INFO)
    stream = io.StringIO()
    handler = logs.log_handler("json", stream)
    logging.getLogger().addHandler(handler)
    try:
        body = {"prompt": "a paper boat", "seed": 5, "width": 64, "height": 64, "steps": 2}
        async with http.post(f"{service.url}/api/generate", json=body) as r:
            assert r.status == 200, await r.text()
            task_id = (await r.json())["task_id"]
        assert (await wait_status(http, service.url, task_id))["status"] == "done"
        for _ in range(200):  # the worker logs its outcome line just after the final status
            if any(line.get("job_id") == task_id and "done in" in line["msg"] for line in json_lines(stream)):
                break
            await asyncio.sleep(0.05)
    finally:
        logging.getLogger().removeHandler(handler)
    about_job = [line for line in json_lines(stream) if task_id in line["msg"] or line.get("job_id") == task_id]
    worker_lines = [line for line in about_job if line["logger"].startswith("imagegen.worker")]
    assert worker_lines, "the worker logged nothing about the job"
    assert all(line.get("job_id") == task_id for line in worker_lines), worker_lines
    (done,) = [line for line in worker_lines if "done in" in line["msg"]]
    assert done["attempt"] == 1 and done["duration_s"] > 0
    (queued,) = [line for line in about_job if line["logger"] == "imagegen.gateway" and "queued" in line["msg"]]
    assert queued["job_id"] == task_id


@pytest.mark.processes  # starts a nats-server of its own
async def test_a_broker_that_is_not_there_yet_is_reported_once_not_on_every_retry(tmp_path, caplog):
    """A process started before its broker retries every half second; the log says so once, and once
    connected, how many tries failed."""
    from imagegen.embedded_nats import EmbeddedNats, free_port
    from schemas.connect import connect

    port = free_port()
    caplog.set_level(logging.INFO, logger="imagegen.nats")
    connecting = asyncio.create_task(connect(f"nats://127.0.0.1:{port}", name="late broker", connect_timeout=1.0))
    await asyncio.sleep(2.5)  # about five tries
    broker = EmbeddedNats(store_dir=tmp_path / "nats", port=port).start()
    try:
        nc = await asyncio.wait_for(connecting, 30)
        await nc.close()
    finally:
        broker.stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "imagegen.nats"]
    errors = [line for line in lines if line.startswith("nats error (late broker)")]
    assert len(errors) == 1 and "Connect call failed" in errors[0], lines
    connected = [line for line in lines if line.startswith("nats connected (late broker) after")]
    assert len(connected) == 1, lines
    assert int(connected[0].split(" after ")[1].split()[0]) >= 2, connected


def test_the_same_connection_error_is_logged_again_after_a_while_with_its_count(caplog):
    from schemas.connect import ConnectionErrors

    now = [0.0]
    errors = ConnectionErrors("worker-1", every_s=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="imagegen.nats")
    refused = ConnectionRefusedError(111, "Connect call failed")
    for _ in range(60):  # half a minute of tries, one each half second
        errors.failed(refused)
        now[0] += 0.5
    errors.failed(TimeoutError("another error"))  # a different error: logged at once
    errors.failed(refused)  # 30 s after the first line: logged again, with the count left out meanwhile
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "nats error (worker-1): ConnectionRefusedError: [Errno 111] Connect call failed",
        "nats error (worker-1): TimeoutError: another error",
        "nats error (worker-1): ConnectionRefusedError: [Errno 111] Connect call failed (59 more times since its last line)",
    ]
    assert errors.connected() == " after 62 errors"
    errors.failed(refused)  # a new run after a reconnect starts with a line at once
    assert len(caplog.records) == 4
