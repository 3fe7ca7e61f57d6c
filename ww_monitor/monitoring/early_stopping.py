"""Alpha-drift stopping rules, as a pure state machine fed one value per snapshot.

Smaller alpha (towards 2) means more learned correlation (Martin & Mahoney 2021), so "better"
is "lower" by default. Three independent criteria, each off when its argument is None:

* **floor**: stop when the value falls below ``floor`` (mean alpha < 2 signals over-training,
  the reference tool's own advice).
* **degradation**: stop when the value rises more than ``max_rise`` above the best seen.
* **converged**: stop when ``|value - previous| < min_delta`` for ``patience`` snapshots in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["DriftDecision", "AlphaDriftRule"]


@dataclass(frozen=True)
class DriftDecision:
    stop: bool
    reason: str = ""
    criterion: str = ""


class AlphaDriftRule:
    """Feed :meth:`update` the monitored value of each snapshot; it says when to stop."""

    def __init__(
        self,
        floor: float | None = 2.0,
        max_rise: float | None = None,
        min_delta: float | None = None,
        patience: int = 3,
        monitor: str = "alpha",
    ):
        if floor is None and max_rise is None and min_delta is None:
            raise ValueError("at least one of floor, max_rise, min_delta must be set")
        if max_rise is not None and max_rise <= 0:
            raise ValueError(f"max_rise must be > 0, got {max_rise}")
        if min_delta is not None and min_delta <= 0:
            raise ValueError(f"min_delta must be > 0, got {min_delta}")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        self.floor, self.max_rise, self.min_delta, self.patience = floor, max_rise, min_delta, patience
        self.monitor = monitor
        self.best = math.inf
        self.previous = math.nan
        self.still_count = 0

    def update(self, value: float) -> DriftDecision:
        if value is None or not math.isfinite(value):
            return DriftDecision(False)  # a failed snapshot is no evidence either way
        m = self.monitor
        decision = DriftDecision(False)
        if self.floor is not None and value < self.floor:
            decision = DriftDecision(True, f"{m} = {value:.3f} fell below the floor {self.floor}", "floor")
        elif self.max_rise is not None and value - self.best > self.max_rise:
            decision = DriftDecision(
                True,
                f"{m} = {value:.3f} rose {value - self.best:.3f} above its best {self.best:.3f} "
                f"(> max_rise {self.max_rise})",
                "degradation",
            )
        elif self.min_delta is not None and math.isfinite(self.previous):
            if abs(value - self.previous) < self.min_delta:
                self.still_count += 1
            else:
                self.still_count = 0
            if self.still_count >= self.patience:
                decision = DriftDecision(
                    True,
                    f"{m} changed by less than {self.min_delta} for {self.patience} snapshots "
                    f"(now {value:.3f}): converged",
                    "converged",
                )
        self.best = min(self.best, value)
        self.previous = value
        return decision

    def state_dict(self) -> dict:
        return {"best": self.best, "previous": self.previous, "still_count": self.still_count}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state.get("best", math.inf))
        self.previous = float(state.get("previous", math.nan))
        self.still_count = int(state.get("still_count", 0))
