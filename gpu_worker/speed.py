"""Measures this worker's speed from the jobs it runs and fits the ETA model of `schemas.workers`.

Per job it records the seconds per base step (against megapixels, least squares over a sliding window),
the decode-and-encode time per megapixel, and the fixed rest; with the refiner, a refiner step's time
over a base step's of the same job, and the hand-over (medians over the window).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from schemas.workers import SpeedModel


def _fit_line(points: deque[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of y over x; flat through the mean when x does not vary."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x < 1e-12:
        return 0.0, mean_y / mean_x if mean_x > 0 else 0.0
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x
    if slope < 0:
        return mean_y, 0.0
    return max(0.0, mean_y - slope * mean_x), slope


def steps_seconds(steps: int, started: float, first_step_at: float | None, last_step_at: float) -> float:
    """Time the denoising steps took: from the spacing of step callbacks, so that the set-up before
    the first step (text encoding, latents) counts as fixed cost, not as step cost."""
    if steps > 1 and first_step_at is not None and last_step_at > first_step_at:
        return (last_step_at - first_step_at) * steps / (steps - 1)
    return last_step_at - started


@dataclass
class StepStamps:
    """When one run's steps ended (monotonic): its first, with the refiner the base's last and the
    refiner's first, and its last. `refiner_steps`: the last steps of the run, on the refiner."""

    refiner_steps: int = 0
    first: float | None = None
    base_done: float | None = None
    refiner_first: float | None = None
    last: float | None = None

    def stamp(self, step: int, total: int, now: float) -> None:
        """Step `step` of `total` ended at `now`."""
        if self.first is None:
            self.first = now
        base = total - self.refiner_steps
        if self.refiner_steps and step == base:
            self.base_done = now
        elif self.refiner_steps and step == base + 1:
            self.refiner_first = now
        if step >= total:
            self.last = now

    def timings(self, total: int, started: float, steps_done: float) -> dict:
        """The run's step timings for `SpeedMeter.record`: its base steps, and with the refiner its part
        (from the base's last step to the refiner's last) and one refiner step."""
        refiner = self.refiner_steps
        if not (refiner and self.base_done is not None and self.refiner_first is not None):
            return dict(steps=total, steps_s=steps_seconds(total, started, self.first, steps_done))
        base = total - refiner
        return dict(
            steps=base,
            steps_s=steps_seconds(base, started, self.first, self.base_done),
            refiner_steps=refiner,
            refiner_s=steps_done - self.base_done,
            refiner_step_s=(steps_done - self.refiner_first) / (refiner - 1) if refiner > 1 else None,
        )


@dataclass
class SpeedMeter:
    window: int = 64
    per_step: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    decode: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=64))
    fixed: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    refiner_ratio: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    refiner_fixed: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    model: SpeedModel = field(default_factory=SpeedModel)

    def record(
        self, *, mpx: float, steps: int, steps_s: float, decode_s: float, total_s: float,
        refiner_steps: int = 0, refiner_s: float = 0.0, refiner_step_s: float | None = None,
    ) -> SpeedModel:
        """One job: its `steps` base steps took `steps_s`; with the refiner, its part (the hand-over and
        `refiner_steps` steps) took `refiner_s`, one of its steps `refiner_step_s` (None when it ran one
        step only, which does not tell the step from the hand-over)."""
        if steps > 0:
            self.per_step.append((mpx, steps_s / steps))
            if refiner_steps and refiner_step_s is not None and steps_s > 0:
                self.refiner_ratio.append(refiner_step_s / (steps_s / steps))
                self.refiner_fixed.append(max(0.0, refiner_s - refiner_step_s * refiner_steps))
        self.decode.append((mpx, decode_s))
        self.fixed.append(max(0.0, total_s - steps_s - refiner_s - decode_s))
        step_s, step_s_per_mpx = _fit_line(self.per_step) if self.per_step else (0.0, 0.0)
        _, decode_s_per_mpx = _fit_line(self.decode)
        self.model = SpeedModel(
            fixed_s=_median(self.fixed),
            step_s=step_s,
            step_s_per_mpx=step_s_per_mpx,
            decode_s_per_mpx=decode_s_per_mpx,
            refiner_step_ratio=_median(self.refiner_ratio) if self.refiner_ratio else 1.0,
            refiner_fixed_s=_median(self.refiner_fixed) if self.refiner_fixed else 0.0,
            samples=self.model.samples + 1,
        )
        return self.model


def _median(values: deque[float]) -> float:
    return sorted(values)[len(values) // 2]
