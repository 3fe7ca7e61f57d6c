"""Compact in-memory history of every snapshot's per-layer metrics.

One :class:`SnapshotRecord` per analysed snapshot: the layer names, a float64 matrix of the
numeric metrics (layers x :data:`HISTORY_METRICS`), the phases as strings and which rank
analysed each layer. No eigenvalues are kept. :meth:`History.state_dict` is made of plain
Python types and tensors only, so it survives ``torch.load(weights_only=True)`` (Lightning
stores it in checkpoints) and :meth:`History.load_state_dict` restores it on resume.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..analysis.results import LayerResult, SkippedLayer

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["HISTORY_METRICS", "SnapshotRecord", "History"]

#: Numeric :class:`~ww_monitor.analysis.results.LayerResult` fields kept per layer and snapshot.
HISTORY_METRICS = (
    "N",
    "M",
    "Q",
    "num_evals",
    "num_slices",
    "lambda_max",
    "log_norm",
    "log_spectral_norm",
    "stable_rank",
    "matrix_rank",
    "rank_loss",
    "entropy",
    "alpha",
    "xmin",
    "xmax",
    "D",
    "sigma",
    "num_pl_spikes",
    "alpha_weighted",
    "log_alpha_norm",
    "fit_ok",
    "lambda_plus",
    "mp_sigma",
    "mp_ks",
    "num_spikes",
    "mp_softrank",
    "num_traps",
    "reliable",
    "distance_from_init",
    "esd_shift",  # training-time extras (NaN when off)
    "frozen",  # 1 when no parameter of the matrix required grad (a bool column in to_pandas)
)

_STATE_VERSION = 1


def _number(value: Any) -> float:
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _phase_str(phase: Any) -> str | None:
    if phase is None:
        return None
    return str(getattr(phase, "value", phase))


@dataclass
class SnapshotRecord:
    """Metrics of every analysed layer at one snapshot."""

    index: int
    step: int
    epoch: int
    layers: tuple[str, ...]
    kinds: tuple[str, ...]
    values: np.ndarray  # float64, len(layers) x len(columns)
    phases: tuple[str | None, ...]
    ranks: tuple[int, ...]
    columns: tuple[str, ...] = HISTORY_METRICS
    skipped: tuple[tuple[str, str], ...] = ()  # (layer, reason) for layers the analysis rejected
    seconds: float = 0.0  # analysis wall time (the slowest rank's)
    errors: tuple[str, ...] = ()
    summary: dict = field(default_factory=dict)

    @staticmethod
    def from_results(
        index: int,
        step: int,
        epoch: int,
        results: Sequence[LayerResult],
        ranks: Sequence[int] | None = None,
        skipped: Sequence[SkippedLayer] = (),
        seconds: float = 0.0,
        errors: Sequence[str] = (),
        summary: dict | None = None,
    ) -> SnapshotRecord:
        values = np.array(
            [[_number(getattr(r, c, None)) for c in HISTORY_METRICS] for r in results], dtype=np.float64
        ).reshape(len(results), len(HISTORY_METRICS))
        return SnapshotRecord(
            index=int(index),
            step=int(step),
            epoch=int(epoch),
            layers=tuple(r.name for r in results),
            kinds=tuple(r.kind for r in results),
            values=values,
            phases=tuple(_phase_str(r.phase) for r in results),
            ranks=tuple(int(x) for x in (ranks if ranks is not None else [0] * len(results))),
            skipped=tuple((s.name, s.reason) for s in skipped),
            seconds=float(seconds),
            errors=tuple(errors),
            summary={k: float(v) for k, v in (summary or {}).items()},
        )

    def metric(self, name: str) -> dict[str, float]:
        """``{layer: value}`` of one metric."""
        j = self.columns.index(name)
        return {layer: float(v) for layer, v in zip(self.layers, self.values[:, j])}

    def to_state(self) -> dict:
        return {
            "index": self.index,
            "step": self.step,
            "epoch": self.epoch,
            "layers": list(self.layers),
            "kinds": list(self.kinds),
            "values": torch.from_numpy(np.ascontiguousarray(self.values)),
            "phases": list(self.phases),
            "ranks": list(self.ranks),
            "columns": list(self.columns),
            "skipped": [list(s) for s in self.skipped],
            "seconds": self.seconds,
            "errors": list(self.errors),
            "summary": dict(self.summary),
        }

    @staticmethod
    def from_state(d: dict) -> SnapshotRecord:
        values = d["values"]
        values = values.numpy() if isinstance(values, torch.Tensor) else np.asarray(values, dtype=np.float64)
        columns = tuple(d.get("columns", HISTORY_METRICS))
        values = values.astype(np.float64).reshape(len(d["layers"]), len(columns))
        if columns != HISTORY_METRICS:  # saved by another version: map by name
            mapped = np.full((values.shape[0], len(HISTORY_METRICS)), np.nan)
            for j, c in enumerate(HISTORY_METRICS):
                if c in columns:
                    mapped[:, j] = values[:, columns.index(c)]
            values = mapped
        return SnapshotRecord(
            index=int(d["index"]),
            step=int(d["step"]),
            epoch=int(d["epoch"]),
            layers=tuple(d["layers"]),
            kinds=tuple(d["kinds"]),
            values=values,
            phases=tuple(d["phases"]),
            ranks=tuple(d["ranks"]),
            skipped=tuple(tuple(s) for s in d.get("skipped", ())),
            seconds=float(d.get("seconds", 0.0)),
            errors=tuple(d.get("errors", ())),
            summary=dict(d.get("summary", {})),
        )


class History:
    """Every analysed snapshot, ordered by step; at most one record per step."""

    def __init__(self) -> None:
        self.records: list[SnapshotRecord] = []

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[SnapshotRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> SnapshotRecord:
        return self.records[i]

    @property
    def steps(self) -> list[int]:
        return [r.step for r in self.records]

    def has_step(self, step: int) -> bool:
        return any(r.step == step for r in self.records)

    def add(self, record: SnapshotRecord) -> bool:
        """Insert in step order; False (and nothing added) if that step is already recorded."""
        if self.has_step(record.step):
            return False
        if self.records and record.layers == self.records[-1].layers:
            record.layers = self.records[-1].layers  # share the names tuple: history stays compact
        self.records.append(record)
        self.records.sort(key=lambda r: r.step)
        return True

    @property
    def layer_names(self) -> list[str]:
        """Every layer seen, in first-seen order."""
        seen: dict[str, None] = {}
        for r in self.records:
            for name in r.layers:
                seen.setdefault(name, None)
        return list(seen)

    def rank_counts(self) -> dict[int, int]:
        """How many layer analyses each rank did, over the whole history."""
        out: dict[int, int] = {}
        for r in self.records:
            for rank in r.ranks:
                out[rank] = out.get(rank, 0) + 1
        return out

    def phases(self, layers: Sequence[str] | None = None) -> tuple[list[str], list[int], list[list]]:
        """``(layer_names, steps, phases[layer][snapshot])`` for a phase heatmap: a
        :class:`~ww_monitor.Phase`, ``"undetermined"`` for a layer analysed without a phase (too
        few eigenvalues), None where the layer was not analysed."""
        from ..analysis.phases import UNDETERMINED, Phase

        names = list(layers) if layers is not None else self.layer_names
        grid = []
        for name in names:
            row: list[Phase | str | None] = []
            for r in self.records:
                try:
                    p = r.phases[r.layers.index(name)]
                except ValueError:
                    row.append(None)
                    continue
                row.append(Phase(p) if p is not None else UNDETERMINED)
            grid.append(row)
        return names, self.steps, grid

    def grid(self, metric: str, layers: Sequence[str] | None = None) -> tuple[list[str], list[int], np.ndarray]:
        """``(layer_names, steps, values[layer, snapshot])`` of one metric of
        :data:`HISTORY_METRICS` for a heatmap; NaN where the layer was not analysed."""
        names = list(layers) if layers is not None else self.layer_names
        j = HISTORY_METRICS.index(metric)
        values = np.full((len(names), len(self.records)), np.nan)
        row = {n: i for i, n in enumerate(names)}
        for k, r in enumerate(self.records):
            for i_rec, layer in enumerate(r.layers):
                i = row.get(layer)
                if i is not None:
                    values[i, k] = r.values[i_rec, j]
        return names, self.steps, values

    def figure_grids(self, layers: Sequence[str]) -> tuple[tuple, tuple]:
        """``(phase_grid, alpha_grid)`` of :func:`~ww_monitor.outputs.tensorboard_writer.render_figures`:
        :meth:`phases` and ``(names, steps, alpha, reliable)`` from :meth:`grid`."""
        names, steps, alpha = self.grid("alpha", layers)
        return self.phases(layers), (names, steps, alpha, self.grid("reliable", layers)[2])

    def to_pandas(self, layer_column: str = "name") -> pd.DataFrame:
        """Long format: one row per (snapshot, layer) with snapshot, step, epoch, name, kind, rank,
        phase and every metric of :data:`HISTORY_METRICS`. ``frozen`` (bool): the matrix did not
        require grad; the training-time monitors analyse such a layer once and carry it forward,
        so it has rows only at the snapshots that analysed it (its values hold until it trains).

        The per-layer columns carry :class:`~ww_monitor.analysis.results.LayerResult`'s field names,
        as in ``Report.to_pandas()`` and the CLI's CSV/JSON, so the layer is ``name`` and the two
        frames join on it. Version 0.1.0 called it ``layer``: ``layer_column="layer"`` keeps that
        name for code written against it (deprecated; it will be removed).
        """
        import pandas as pd

        if layer_column not in ("name", "layer"):
            from ..errors import WWMonitorError

            raise WWMonitorError(
                f"History.to_pandas: `layer_column` must be 'name' or 'layer' (the name in 0.1.0), "
                f"got {layer_column!r}."
            )
        head = ["snapshot", "step", "epoch", layer_column, "kind", "rank"]
        frames = []
        for r in self.records:
            df = pd.DataFrame(r.values, columns=list(r.columns))
            for i, (column, value) in enumerate(
                zip(head, (r.index, r.step, r.epoch, list(r.layers), list(r.kinds), list(r.ranks)))
            ):
                df.insert(i, column, value)
            df["phase"] = list(r.phases)
            frames.append(df)
        if not frames:
            return pd.DataFrame(columns=[*head, *HISTORY_METRICS, "phase"])
        df = pd.concat(frames, ignore_index=True)
        df["frozen"] = df["frozen"] == 1.0  # NaN (a state saved before the column existed): not frozen
        return df

    def metric(self, name: str) -> pd.DataFrame:
        """Wide pandas frame of one metric: index = step, one column per layer."""
        df = self.to_pandas()
        return df.pivot(index="step", columns="name", values=name)

    def state_dict(self) -> dict:
        return {"version": _STATE_VERSION, "records": [r.to_state() for r in self.records]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = []
        for d in state.get("records", []):
            self.add(SnapshotRecord.from_state(d))
