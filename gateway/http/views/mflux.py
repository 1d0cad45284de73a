"""mflux-server's shapes (`/api/...`): a generation queued, a task's status and record, the served
models and the model load."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class MfluxGenerateResponse(BaseModel):
    task_id: str
    task_length: int = Field(description="Jobs ahead of this one, running ones included, plus itself.")
    expected_time_seconds: float
    task_ids: list[str] | None = Field(None, description="With n > 1: every task of the request, task_id first.")
    group_id: str | None = Field(None, description="With n > 1: the group of the tasks (GET /v1/groups/{group_id}).")
    cached: bool | None = Field(None, description="true when answered from the result cache: the image is ready now.")


class MfluxStatusResponse(BaseModel):
    status: str = Field(description="waiting (queued or running), done, or error.")
    pos: int | None = Field(None, description="Jobs queued ahead; 0 when running or next.")
    wait_remaining: float | None = Field(None, description="Seconds until the image is expected.")
    error: str | None = None
    cached: bool | None = Field(None, description="true when the image came from the result cache.")
    nsfw: bool | None = Field(None, description="true when the safety check replaced the image by a black one.")


class MfluxTask(BaseModel):
    task_id: str
    status: str
    prompt: str
    seed: int
    width: int
    height: int
    steps: int | None = None
    guidance: float | None = None
    format: str
    quality: int
    priority: bool
    start_time: float | None = None
    compute_time: float | None = None
    end_time: float | None = None


class ModelInfo(BaseModel):
    steps: int
    guidance: float
    refiner: bool = False
    workers: int = 0


class MfluxPs(BaseModel):
    model: str | None
    quantize: Any = None
    default_steps: int | None = None
    default_guidance: float | None = None
    workers: int = 0


class LoadRequest(BaseModel):
    model: str
