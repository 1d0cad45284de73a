"""The GPU temperature guard: above `max_c` the worker takes no new job until its GPU cools to `resume_c`.

It is asked before every pull; the job in hand always finishes. A sensor is anything with
`read() -> degrees Celsius`; `NvmlSensor` reads the worker's GPU through NVML (nvidia-ml-py's
`pynvml`). Without NVML or a GPU the guard is off, said once in the log. While it holds, the worker's
registry entry says `paused_hot`, so gateways leave the worker out of their ETAs.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Awaitable, Callable, Protocol

log = logging.getLogger("imagegen.worker.thermal")


class TemperatureSensor(Protocol):
    def read(self) -> float:
        """The GPU temperature in degrees Celsius."""
        ...


class NvmlSensor:
    """The core temperature of the GPU a CUDA device name (`cuda:N`) stands for, from NVML."""

    def __init__(self, device: str):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = _nvml_handle(pynvml, int(device.partition(":")[2] or 0))

    def read(self) -> float:
        return float(self.nvml.nvmlDeviceGetTemperature(self.handle, self.nvml.NVML_TEMPERATURE_GPU))


def _nvml_handle(pynvml: Any, index: int) -> Any:
    """NVML numbers GPUs physically, CUDA after CUDA_VISIBLE_DEVICES: match by UUID when torch says it."""
    try:
        import torch

        uuid = str(torch.cuda.get_device_properties(index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # an older torch, or no CUDA here: count through CUDA_VISIBLE_DEVICES
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if index < len(visible) and visible[index].isdigit():
            index = int(visible[index])
        return pynvml.nvmlDeviceGetHandleByIndex(index)


class TemperatureGuard:
    """Hysteresis over a sensor: hot from `max_c` up, cool again at `resume_c` and below. A sensor
    that fails to read counts as cool (logged), so a broken sensor never stops the pool. The limits
    are checked here, once; `sensor` may be set after (temperature_guard does, once NVML opens)."""

    def __init__(self, sensor: TemperatureSensor | None, *, max_c: float = 85.0, resume_c: float = 75.0, poll_s: float = 2.0):
        if resume_c >= max_c:
            raise ValueError(f"--resume-gpu-temp ({resume_c:g}) must be below --max-gpu-temp ({max_c:g})")
        self.sensor = sensor
        self.max_c = max_c
        self.resume_c = resume_c
        self.poll_s = poll_s
        self.paused = False
        self.last_c: float | None = None
        self._read_failed = False

    def hot(self) -> bool:
        """Reads the sensor and says whether new jobs must wait."""
        try:
            self.last_c = float(self.sensor.read())
        except Exception as exc:
            if not self._read_failed:
                log.warning("GPU temperature unreadable (%s: %s); taking jobs as if cool", type(exc).__name__, exc)
            self._read_failed, self.last_c, self.paused = True, None, False
            return False
        self._read_failed = False
        if self.paused:
            self.paused = self.last_c > self.resume_c
        else:
            self.paused = self.last_c >= self.max_c
        return self.paused

    async def wait_until_cool(self, stopping: asyncio.Event, *, on_change: Callable[[], Awaitable[None]]) -> None:
        """Returns at once when cool; else, after `on_change`, reads every `poll_s` until the GPU is
        at `resume_c` or below (or the worker stops), then calls `on_change` again."""
        if not self.hot():
            return
        log.warning(
            "GPU at %.0f°C (limit %.0f°C): taking no new job until %.0f°C", self.last_c, self.max_c, self.resume_c
        )
        await on_change()
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            if not self.hot():
                break
        if not self.paused and self.last_c is not None:
            log.info("GPU at %.0f°C: taking jobs again", self.last_c)
        await on_change()


def temperature_guard(settings: Any, *, device: str, sensor: TemperatureSensor | None = None) -> TemperatureGuard | None:
    """The guard `settings` describe (max_gpu_temp, resume_gpu_temp; 0 turns it off) over `sensor`,
    or over NVML for a CUDA device; None, logged once, where there is neither."""
    if settings.max_gpu_temp <= 0:
        log.info("GPU temperature guard off (--max-gpu-temp 0)")
        return None
    guard = TemperatureGuard(  # refuses a resume temperature not below the limit, with or without a sensor
        sensor, max_c=settings.max_gpu_temp, resume_c=settings.resume_gpu_temp, poll_s=settings.gpu_temp_poll_s
    )
    if sensor is not None:
        return guard
    if not device.startswith("cuda"):
        log.info("GPU temperature guard off: no GPU (device %s)", device)
        return None
    try:
        guard.sensor = NvmlSensor(device)
        log.info(
            "GPU temperature guard on: %s at %.0f°C, pauses at %.0f°C, resumes at %.0f°C",
            device, guard.sensor.read(), guard.max_c, guard.resume_c,
        )
        return guard
    except Exception as exc:  # no nvidia-ml-py, no driver library, or NVML refuses the device
        log.info("GPU temperature guard off: NVML unavailable (%s: %s)", type(exc).__name__, exc)
        return None
