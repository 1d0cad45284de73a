"""What became of a ComfyUI prompt, read from its jobs' records: its images under each output node, and
ComfyUI's last message for it (execution_success, execution_error or execution_interrupted)."""

from __future__ import annotations

from gateway.apis.comfy.node_classes import SOCKET_OUTPUT
from gateway.apis.comfy.record import ComfyPrompt
from gateway.core.problems import UnknownJob
from gateway.core.service import JobService
from schemas.events import JobEvent
from schemas.status import JobState, JobStatus


def image_name(job_id: str) -> str:
    return f"{job_id}.png"


async def job_records(jobs: JobService, prompt: ComfyPrompt, owner: str | None) -> list[JobStatus | None]:
    """The prompt's job records, in order (None for one gone: deleted, or past its TTL)."""
    records: list[JobStatus | None] = []
    for job_id in prompt.job_ids:
        try:
            records.append(await jobs.get(job_id, owner=owner))
        except UnknownJob:
            records.append(None)
    return records


def output_images(prompt: ComfyPrompt, records: list[JobStatus | None]) -> dict[str, dict]:
    """Each output node's images, as ComfyUI's `executed` and history give them. A SaveImageWebsocket
    node has none there: its images went to the socket, as in ComfyUI."""
    return {
        node: {"images": [{"filename": image_name(r.job_id), "subfolder": "", "type": "output" if kind == "SaveImage" else "temp"}
                          for r in shown_by(prompt, node, records) if r is not None and r.state is JobState.DONE]}
        for node, kind in sorted(prompt.outputs.items()) if kind != SOCKET_OUTPUT
    }


def shown_by(prompt: ComfyPrompt, node: str, records: list[JobStatus | None]) -> list[JobStatus | None]:
    """The records of the jobs whose images output `node` shows: all, unless outputs show different VAEDecodes."""
    if not prompt.output_jobs:
        return records
    wanted = set(prompt.output_jobs.get(node, ()))
    return [r for r in records if r is not None and r.job_id in wanted]


def ended_at(prompt: ComfyPrompt, records: list[JobStatus | None]) -> float:
    """When the prompt ended: its last job's end (the prompt's queueing when no record tells)."""
    ends = [r.finished_at for r in records if r is not None and r.finished_at is not None]
    return max(ends, default=prompt.submitted_at)


def ending(prompt: ComfyPrompt, records: list[JobStatus | None], stopped_by: JobEvent | None = None) -> tuple[str, dict]:
    """ComfyUI's last message for a prompt that has ended (when `stopped_by`, by that job's end):
    execution_success, execution_error or execution_interrupted."""
    stamp = {"prompt_id": prompt.prompt_id, "timestamp": int(ended_at(prompt, records) * 1000)}
    if stopped_by is None and all(r is not None and r.state is JobState.DONE for r in records):
        return "execution_success", stamp
    where = {"node_id": prompt.sampler_node, "node_type": "KSampler", "executed": []}
    if stopped_by is not None:
        state, reason = stopped_by.type, stopped_by.reason or stopped_by.type
    else:
        stopped = next((r for r in records if r is None or r.state.final and r.state is not JobState.DONE), None)
        state = stopped.state.value if stopped is not None else "gone"
        reason = (stopped.error or state) if stopped is not None else "a job's record is gone (deleted, or past its TTL)"
    if state == JobState.CANCELLED.value:
        return "execution_interrupted", {**stamp, **where}
    return "execution_error", {
        **stamp, **where, "exception_message": reason, "exception_type": f"imagegen.{state}",
        "traceback": [], "current_inputs": {}, "current_outputs": {},
    }


def finished(records: list[JobStatus | None]) -> bool:
    return all(r is None or r.state.final for r in records)
