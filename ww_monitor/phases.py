"""The 5+1 phases of training (Martin & Mahoney, JMLR 2021) and the rules that assign them."""

from __future__ import annotations

from enum import Enum

__all__ = ["Phase"]


class Phase(str, Enum):
    """Phase of a layer's ESD, in the order training moves through them (+1 rank collapse)."""

    RANDOM_LIKE = "random-like"
    BLEEDING_OUT = "bleeding-out"
    BULK_PLUS_SPIKES = "bulk+spikes"
    BULK_DECAY = "bulk-decay"
    HEAVY_TAILED = "heavy-tailed"
    RANK_COLLAPSE = "rank-collapse"

    def __str__(self) -> str:
        return self.value
