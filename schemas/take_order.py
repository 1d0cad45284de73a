"""The order in which workers take queued jobs: the rule `gpu_worker.puller` follows, and the one the
gateway's forecasts (gateway.state.forecast) plan with.

A worker takes from the highest tier with work, except that after `fairness` jobs in a row taken from
a higher tier while a lower one had work waiting, it takes from the lowest tier with work, and counts
from zero again (as it does after taking a low-tier job, or finding no work at all). So a low-tier job
does not wait for every higher-tier job queued after it: with 10 normal jobs and 1 low one queued, the
low one can be taken before the last normal ones.

Each worker keeps its own count. The gateway keeps a copy, `TakeCounts`, from the records it sees: a job
marked running by a worker is a take; a worker that ends a job while nothing is queued finds no work
next and starts from zero.
"""

from __future__ import annotations

from schemas.names import TIERS, Tier


def lower_tiers_turn(skipped: int, fairness: int) -> bool:
    """Whether a worker with this count takes next from the lowest tier with work (else the highest)."""
    return skipped >= fairness


def next_take(waiting: list[Tier], skipped: int, fairness: int) -> tuple[Tier, int]:
    """The tier a worker takes its next job from, given the tiers with work (highest first) and its
    count of jobs taken in a row from a higher tier while a lower one waited; and its count after."""
    tier = waiting[-1] if lower_tiers_turn(skipped, fairness) else waiting[0]
    return tier, count_after(tier, skipped, fairness, lower_waiting=waiting[-1] is not tier)


def count_after(tier: Tier, skipped: int, fairness: int, *, lower_waiting: bool) -> int:
    """A worker's count after it took a job of `tier`; `lower_waiting`: a lower tier had work then."""
    if lower_tiers_turn(skipped, fairness) or tier is TIERS[-1]:
        return 0
    return skipped + 1 if lower_waiting else skipped


class TakeCounts:
    """Each worker's count, as the gateway sees it."""

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}

    def of(self, worker_id: str) -> int:
        return self.skipped.get(worker_id, 0)

    def taken(self, worker_id: str, tier: Tier, *, lower_waiting: bool, fairness: int) -> None:
        """The worker took a job of `tier`; `lower_waiting`: a lower tier had jobs queued then."""
        self.skipped[worker_id] = count_after(tier, self.of(worker_id), fairness, lower_waiting=lower_waiting)

    def idle(self, worker_id: str) -> None:
        """The worker finds no work: it counts from zero."""
        self.skipped.pop(worker_id, None)
