"""Shapes of the HTTP responses, so the OpenAPI document and the handlers share one definition."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="What is wrong, naming the field.")
    field: str | None = None
    errors: list[dict[str, str]] | None = None


class MfluxGenerateResponse(BaseModel):
    task_id: str
    task_length: int = Field(description="Jobs ahead of this one, running ones included, plus itself.")
    expected_time_seconds: float


class MfluxStatusResponse(BaseModel):
    status: str = Field(description="waiting (queued or running), done, or error.")
    pos: int | None = Field(None, description="Jobs queued ahead; 0 when running or next.")
    wait_remaining: float | None = Field(None, description="Seconds until the image is expected.")
    error: str | None = None


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


class JobView(BaseModel):
    """A job as the native API shows it."""

    job_id: str
    state: str
    tier: str
    position: int | None = Field(None, description="Jobs queued ahead (queued jobs only).")
    eta_s: float | None = Field(None, description="Seconds until the image is expected (queued and running).")
    step: int = 0
    total_steps: int = 0
    seed: int
    request: dict
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempt: int = 0
    error: str | None = None
    image_url: str | None = None
    events_url: str
    websocket_url: str
