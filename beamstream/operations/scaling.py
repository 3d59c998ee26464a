"""When to start or stop analysis workers, and what to warn about: pure functions of what
the monitor observes (no Kafka, no processes), so the policy is tested on its own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScalingPolicy:
    """Bounds and thresholds of local autoscaling."""

    min_workers: int = 1
    max_workers: int = 4
    lag_per_worker: int = 200  # image events waiting that justify one more worker
    scale_down_after_s: float = 30.0  # fewer workers would do for this long before one is stopped
    growth_intervals: int = 3  # consecutive growing observations before "lag growing" is said

    def check(self) -> None:
        """Raise ValueError naming the bad bound."""
        if self.min_workers < 0:
            raise ValueError("--min-workers must be >= 0")
        if self.max_workers < max(self.min_workers, 1):
            raise ValueError("--max-workers must be >= --min-workers and >= 1")
        if self.lag_per_worker < 1:
            raise ValueError("--lag-per-worker must be >= 1")
        if self.scale_down_after_s < 0:
            raise ValueError("--scale-down-after must be >= 0")
        if self.growth_intervals < 1:
            raise ValueError("growth_intervals must be >= 1")


@dataclass
class ScalingMemory:
    """What the policy remembers between observations."""

    last_needed: float | None = None  # last time the current number of workers was needed
    previous_lag: int | None = None
    growing_for: int = 0
    warned_growth_at: int = 0


@dataclass(frozen=True)
class Alert:
    """A warning for staff: a machine-readable code and one line."""

    code: str
    message: str


@dataclass(frozen=True)
class Decision:
    """The number of workers wanted after an observation, why, and the warnings it raised."""

    target: int
    code: str | None  # scale_up, scale_down, or None (no change)
    reason: str
    warnings: list[Alert] = field(default_factory=list)


def workers_for(policy: ScalingPolicy, lag: int) -> int:
    """Workers the lag asks for, within the policy's bounds."""
    wanted = math.ceil(max(lag, 0) / policy.lag_per_worker)
    return min(max(wanted, policy.min_workers), policy.max_workers)


def decide(policy: ScalingPolicy, memory: ScalingMemory, workers: int, lag: int, new_dead_letters: int,
           now: float) -> Decision:
    """Scale up at once when the lag asks for more workers; scale down one worker at a time, and only
    after fewer workers would have done for ``scale_down_after_s``: a burst's tail, or a pause between
    two grid scans, must not make workers come and go."""
    wanted = workers_for(policy, lag)
    warnings = _warnings(policy, memory, workers, lag, new_dead_letters)
    if wanted > workers:
        memory.last_needed = now
        return Decision(wanted, "scale_up", f"{lag} images waiting: {workers} -> {wanted} workers", warnings)
    if wanted == workers or memory.last_needed is None:
        memory.last_needed = now
        return Decision(workers, None, f"{lag} images waiting, {workers} workers", warnings)
    idle_for = now - memory.last_needed
    if idle_for >= policy.scale_down_after_s:
        memory.last_needed = now
        return Decision(workers - 1, "scale_down",
                        f"{lag} images waiting for {idle_for:.0f} s: {workers} -> {workers - 1} workers", warnings)
    return Decision(workers, None, f"{lag} images waiting; {wanted} workers would do", warnings)


def _warnings(policy: ScalingPolicy, memory: ScalingMemory, workers: int, lag: int,
              new_dead_letters: int) -> list[Alert]:
    warnings = []
    growing = memory.previous_lag is not None and lag > memory.previous_lag
    memory.growing_for = memory.growing_for + 1 if growing else 0
    memory.previous_lag = lag
    # Said once when the growth has lasted long enough, then again every as many intervals.
    if memory.growing_for and memory.growing_for % policy.growth_intervals == 0:
        at_max = workers >= policy.max_workers
        code = "lag_at_max" if at_max else "lag_growing"
        detail = (f"already at the maximum of {policy.max_workers} workers" if at_max
                  else f"{workers} workers")
        warnings.append(Alert(code, f"lag has grown for {memory.growing_for} intervals to {lag} images; "
                                       f"{detail}"))
    if new_dead_letters > 0:
        warnings.append(Alert("dead_letters", f"{new_dead_letters} new dead letters "
                                                 "(`beamstream dlq list` shows why)"))
    return warnings
