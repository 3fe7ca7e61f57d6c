"""What a balancer decided at each update: alphas in, factors out, kept for resume and analysis."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

__all__ = ["BalanceRecord", "BalanceHistory"]


@dataclass(frozen=True)
class BalanceRecord:
    """One update: per layer (in model order) the alpha used (NaN: unreliable), whether it was
    balanced, and the factor applied from then on."""

    step: int
    epoch: int
    source: str  # "hill_median" / "ww" (computed here) or "monitor:<estimator>@<snapshot step>"
    layers: tuple[str, ...]
    alphas: tuple[float, ...]
    balanced: tuple[bool, ...]
    factors: tuple[float, ...]

    def factor_map(self) -> dict[str, float]:
        return dict(zip(self.layers, self.factors))

    def alpha_map(self) -> dict[str, float]:
        return dict(zip(self.layers, self.alphas))

    def to_state(self) -> dict:
        d = asdict(self)
        for k in ("layers", "alphas", "balanced", "factors"):
            d[k] = list(d[k])
        return d

    @staticmethod
    def from_state(d: dict) -> BalanceRecord:
        return BalanceRecord(
            step=int(d["step"]),
            epoch=int(d["epoch"]),
            source=str(d["source"]),
            layers=tuple(d["layers"]),
            alphas=tuple(float(a) for a in d["alphas"]),
            balanced=tuple(bool(b) for b in d["balanced"]),
            factors=tuple(float(f) for f in d["factors"]),
        )


class BalanceHistory:
    """Every update of a balancer, in order."""

    def __init__(self):
        self.records: list[BalanceRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[BalanceRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> BalanceRecord:
        return self.records[i]

    def add(self, record: BalanceRecord) -> None:
        self.records.append(record)

    def to_pandas(self):
        """Long format: one row per (update, layer) with step, epoch, source, name (the layer, as in
        the monitor's ``history.to_pandas()`` and ``Report.to_pandas()``), alpha, balanced, factor."""
        import pandas as pd

        columns = ["step", "epoch", "source", "name", "alpha", "balanced", "factor"]
        rows = [
            dict(zip(columns, (r.step, r.epoch, r.source, name, a, b, f)))
            for r in self.records
            for name, a, b, f in zip(r.layers, r.alphas, r.balanced, r.factors)
        ]
        return pd.DataFrame(rows, columns=columns)

    def state_dict(self) -> dict:
        return {"records": [r.to_state() for r in self.records]}

    def load_state_dict(self, state: dict) -> None:
        self.records = [BalanceRecord.from_state(d) for d in state.get("records", [])]
