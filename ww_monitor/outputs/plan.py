"""What monitoring a model will cost, before the run: ``ww-monitor plan`` and ``callback.plan(model)``.

From the weights' shapes alone (a meta-device model built from a config, a checkpoint's
headers, or a live module) and the monitor's settings, per snapshot:

* the matrices analysed, selected exactly as the monitor selects them
  (:func:`~ww_monitor.analysis.selection.select_matrices` on stand-in weights, as for a sharded
  model: size limits, include/exclude, kinds, tied weights once, conv kernels pooled, frozen
  matrices) and those skipped, with the monitor's reasons;
* the bytes each rank copies: the matrices it owns under the monitor's greedy split
  (:func:`~ww_monitor.monitoring.distributed.assign_owners`), in the weights' dtype (what the
  snapshot buffers hold);
* the analysis seconds per rank on this machine's CPU with the worker's thread count, from the
  calibrated cost model (:mod:`ww_monitor.monitoring.cost`), and the same if matrices whose
  smaller side exceeds ``estimate_above`` took the sampled estimate (``wwm.analyze``'s
  ``estimate_above=``);
* a schedule that keeps the monitor within ``max_overhead``: the slowest rank's copy plus
  analysis may cost at most ``max_overhead`` of the training time between two snapshots
  (:mod:`ww_monitor.monitoring.budget`), so snapshots are at least ``cost / max_overhead``
  seconds of training apart.

A GPU analysis (``device="cuda"``) is not calibrated here: its time is reported as unmeasured,
never guessed; the CPU figures say what the analysis costs on this CPU (``analysis_device="cpu"``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..analysis.estimate import wants_estimate
from ..analysis.results import SkippedLayer
from ..analysis.selection import AnalysisConfig, select_matrices
from ..errors import WWMonitorError
from ..functional.sampled import DEFAULT_SAMPLE_SIZE
from ..monitoring.cost import calibration, matrix_seconds, sampled_seconds, stream_calibration
from ..monitoring.distributed import assign_owners, matrix_cost, strip_wrapper_names
from ..monitoring.model_view import stand_in
from ..monitoring.sharded import plan_sharded
from ..validation import check_fraction, check_int, check_number

__all__ = ["PlannedMatrix", "CostPlan", "plan_costs", "format_plan", "DEVICES", "ASSUMED_STEP_SECONDS"]

DEVICES = ("cpu", "cuda")
#: Training step time assumed when none is given: the schedule is also printed in seconds of
#: training, which does not depend on it.
ASSUMED_STEP_SECONDS = 1.0
_GIB = 1024**3


@dataclass(frozen=True)
class PlannedMatrix:
    """One analysed matrix: where it goes and what it costs per snapshot (CPU seconds, this machine)."""

    name: str
    kind: str
    shape: tuple
    dtype: str
    nbytes: int
    rank: int | None  #: owner at the snapshots after the baseline (None: frozen, carried forward)
    baseline_rank: int  #: owner at the baseline, where every matrix is copied
    seconds: float
    sampled_seconds: float  #: with ``estimate_above`` (equal to ``seconds`` when not sampled)
    sampled: bool
    frozen: bool = False  #: no parameter it reads requires grad
    aliases: tuple = ()  #: other names of this tied tensor (copied and analysed once)


@dataclass
class CostPlan:
    """The cost of one snapshot, per rank; :func:`format_plan` prints it, :meth:`to_dict` is JSON-ready."""

    source: str
    ranks: int
    device: str
    threads: int | None
    estimate_above: int | None
    max_overhead: float | None
    step_seconds: float
    step_seconds_assumed: bool
    every_n_train_steps: int | None
    every_n_epochs: int | None
    steps_per_epoch: int | None
    matrices: list[PlannedMatrix] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    copy_bytes_per_second: float = math.inf
    calibration_seconds: float = 0.0
    watch_frozen: bool = False

    def _per_rank(self, key, baseline: bool = False) -> list[float]:
        """Per rank, at the snapshots after the baseline (frozen matrices carried) or at the baseline."""
        out = [0.0] * self.ranks
        for m in self.matrices:
            rank = m.baseline_rank if baseline else m.rank
            if rank is not None:
                out[rank] += key(m)
        return out

    @property
    def frozen(self) -> list[PlannedMatrix]:
        """Matrices analysed at the baseline only and carried forward afterwards."""
        return [m for m in self.matrices if m.rank is None]

    @property
    def bytes_per_rank(self) -> list[int]:
        return [int(b) for b in self._per_rank(lambda m: m.nbytes)]

    @property
    def matrices_per_rank(self) -> list[int]:
        return [int(c) for c in self._per_rank(lambda m: 1)]

    @property
    def seconds_per_rank(self) -> list[float]:
        return self._per_rank(lambda m: m.seconds)

    @property
    def sampled_seconds_per_rank(self) -> list[float]:
        return self._per_rank(lambda m: m.sampled_seconds)

    def snapshot_seconds(self, sampled: bool = False, baseline: bool = False) -> float | None:
        """Copy plus analysis on the slowest rank: what one snapshot after the baseline (or the
        baseline) costs the run; the budget waits for every rank. ``None`` on a GPU (not calibrated)."""
        if self.device != "cpu":
            return None
        per_rank = self._per_rank(lambda m: m.sampled_seconds if sampled else m.seconds, baseline)
        copies = [b / self.copy_bytes_per_second for b in self._per_rank(lambda m: m.nbytes, baseline)]
        return max(c + s for c, s in zip(copies, per_rank)) if per_rank else 0.0

    def seconds_between_snapshots(self, sampled: bool = False) -> float | None:
        """Least training seconds between two budgeted snapshots (``None``: no budget, or on a GPU)."""
        cost = self.snapshot_seconds(sampled)
        if cost is None or self.max_overhead is None:
            return None
        return cost / self.max_overhead

    def suggested_every_n_train_steps(self, sampled: bool = False) -> int | None:
        gap = self.seconds_between_snapshots(sampled)
        return None if gap is None else max(1, math.ceil(gap / self.step_seconds))

    def scheduled_overhead(self) -> float | None:
        """The share of training time the requested schedule would cost without the budget."""
        cost = self.snapshot_seconds()
        steps = self.every_n_train_steps
        if steps is None and self.every_n_epochs is not None and self.steps_per_epoch is not None:
            steps = self.every_n_epochs * self.steps_per_epoch
        if cost is None or steps is None:
            return None
        return cost / (steps * self.step_seconds)

    def __str__(self) -> str:
        return format_plan(self)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("matrices", "skipped")}
        d["copy_bytes_per_second"] = None if math.isinf(self.copy_bytes_per_second) else self.copy_bytes_per_second
        d["matrices"] = [dict(asdict(m), shape=list(m.shape), aliases=list(m.aliases)) for m in self.matrices]
        d["skipped"] = [s.to_dict() for s in self.skipped]
        d["per_rank"] = [
            {"rank": r, "matrices": c, "bytes": b, "analysis_seconds": s, "sampled_seconds": e}
            for r, (c, b, s, e) in enumerate(
                zip(self.matrices_per_rank, self.bytes_per_rank, self.seconds_per_rank, self.sampled_seconds_per_rank)
            )
        ]
        d["baseline_per_rank"] = [
            {"rank": r, "matrices": int(c), "bytes": int(b)}
            for r, (c, b) in enumerate(zip(self._per_rank(lambda m: 1, True), self._per_rank(lambda m: m.nbytes, True)))
        ]
        d["baseline_snapshot_seconds"] = self.snapshot_seconds(baseline=True)
        d["snapshot_seconds"] = self.snapshot_seconds()
        d["snapshot_seconds_sampled"] = self.snapshot_seconds(sampled=True)
        d["seconds_between_snapshots"] = self.seconds_between_snapshots()
        d["suggested_every_n_train_steps"] = self.suggested_every_n_train_steps()
        d["suggested_every_n_train_steps_sampled"] = self.suggested_every_n_train_steps(sampled=True)
        d["scheduled_overhead"] = self.scheduled_overhead()
        return d


def plan_costs(
    model,
    config: AnalysisConfig,
    *,
    ranks: int = 1,
    device: str = "cpu",
    threads: int | None = 1,
    estimate_above: int | None = DEFAULT_SAMPLE_SIZE,
    max_overhead: float | None = None,
    step_seconds: float | None = None,
    every_n_train_steps: int | None = None,
    every_n_epochs: int | None = None,
    steps_per_epoch: int | None = None,
    watch_frozen: bool = False,
    source: str = "model",
) -> CostPlan:
    """The :class:`CostPlan` of ``model`` (a module, possibly on the meta device, or a state dict of
    tensors, possibly meta) under the selection ``config``. See the module docstring. Frozen
    matrices are copied at the baseline only unless ``watch_frozen`` (:mod:`ww_monitor.monitoring.carry`)."""
    check_int("ranks", ranks, 1)
    if device not in DEVICES:
        raise WWMonitorError(f"`device` must be one of {DEVICES}, got {device!r}.")
    check_int("threads", threads, 1, allow_none=True)
    check_int("estimate_above", estimate_above, 1, allow_none=True)
    check_fraction("max_overhead", max_overhead)
    check_number("step_seconds", step_seconds, allow_none=True, above=0)
    check_int("every_n_train_steps", every_n_train_steps, 1, allow_none=True)
    check_int("every_n_epochs", every_n_epochs, 1, allow_none=True)
    check_int("steps_per_epoch", steps_per_epoch, 1, allow_none=True)
    with torch.no_grad():
        found, skipped = _select(model, config)
    for m in found:  # the names the monitor logs (wrappers stripped), as distributed.collect_into does
        m.name = strip_wrapper_names(m.name)
    skipped = [SkippedLayer(strip_wrapper_names(s.name), s.kind, s.shape, s.reason, s.aliases) for s in skipped]
    baseline_owners = assign_owners([matrix_cost(m) for m in found], ranks)
    # After the baseline the monitor leaves the frozen matrices out before assigning owners.
    watched = [m for m in found if watch_frozen or not m.frozen]
    later = dict(zip((id(m) for m in watched), assign_owners([matrix_cost(m) for m in watched], ranks)))
    cal = calibration(threads)
    stream = stream_calibration() if device == "cpu" else None
    plan = CostPlan(
        source=source,
        ranks=ranks,
        device=device,
        threads=threads,
        estimate_above=estimate_above,
        max_overhead=max_overhead,
        step_seconds=step_seconds or ASSUMED_STEP_SECONDS,
        step_seconds_assumed=step_seconds is None,
        every_n_train_steps=every_n_train_steps,
        every_n_epochs=every_n_epochs,
        steps_per_epoch=steps_per_epoch,
        skipped=skipped,
        calibration_seconds=cal.seconds,
        watch_frozen=watch_frozen,
    )
    if stream is not None:  # a snapshot's buffers are fresh memory, written once and read by the copy
        plan.copy_bytes_per_second = 1.0 / (stream.fresh + stream.matvec)
    for m, base_rank in zip(found, baseline_owners):
        w = m.weight
        full = matrix_seconds(tuple(w.shape), w.dtype, config.method, cal)
        sampled = wants_estimate(m, estimate_above)
        est = (
            sampled_seconds(tuple(w.shape), w.dtype, config.estimate_size, config.estimate_samples, config.method, cal)
            if sampled
            else full
        )
        plan.matrices.append(
            PlannedMatrix(
                m.name,
                m.kind,
                tuple(w.shape),
                str(w.dtype).replace("torch.", ""),
                w.numel() * w.element_size(),
                later.get(id(m)),
                base_rank,
                full,
                est,
                sampled,
                bool(m.frozen),
                tuple(m.aliases),
            )
        )
    return plan


def _select(model, config: AnalysisConfig):
    """The monitor's selection from shapes alone: every tensor is read as a stand-in (a tensor of
    its shape and dtype, without memory, that the selection takes for a weight), as the monitor
    plans a sharded model (:func:`~ww_monitor.monitoring.sharded.plan_sharded`). A state dict's
    tensors that share storage (a tied weight saved under two names) share one stand-in."""
    if isinstance(model, nn.Module):
        planned = plan_sharded(model, config)
        return planned.matrices, planned.skipped
    if not isinstance(model, Mapping):
        raise WWMonitorError(f"expected an nn.Module or a state dict, got {type(model).__name__}")
    shared: dict = {}

    def shape_only(t):
        if not isinstance(t, torch.Tensor):
            return t
        storage = t.untyped_storage()  # meta storages have no address; their storage object is the identity
        base = getattr(storage, "_cdata", None) if t.is_meta else storage.data_ptr()
        key = (base if base is not None else ("tensor", id(t)), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        return shared.setdefault(key, stand_in(t.shape, t.dtype))

    return select_matrices({k: shape_only(v) for k, v in model.items()}, config)


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", _GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def _secs(s: float | None) -> str:
    if s is None:
        return "unmeasured"
    return f"{s:.3g} s" if s < 100 else f"{s:,.0f} s"


def _num(s: float) -> str:
    return f"{s:,.2f}" if s >= 1 else f"{s:.3g}"


def _shape(shape) -> str:
    return " x ".join(str(s) for s in shape)


def format_plan(plan: CostPlan) -> str:
    """The plan as text, every line at most 100 columns: shapes, per-rank table, schedule, skipped."""
    sampled = any(m.sampled for m in plan.matrices)
    est = f"estimate_above={plan.estimate_above}"
    frozen = plan.frozen
    lines = [
        f"cost plan: {plan.source}",
        f"  {len(plan.matrices) - len(frozen)} matrices analysed per snapshot, {len(plan.skipped)} skipped; "
        f"{plan.ranks} rank(s); analysis on {plan.device}"
        + (f" with {plan.threads} thread(s)" if plan.threads else ""),
    ]
    if frozen:
        lines.append(
            f"  + {len(frozen)} frozen matrices (no parameter requires grad), copied and analysed at the "
            "baseline only, then carried forward (watch_frozen=True analyses them every time)"
        )
    if plan.device != "cpu":
        lines.append(
            "  GPU analysis time: unmeasured (no GPU calibration here); the seconds below are this "
            "CPU's, what the analysis costs with analysis_device='cpu'"
        )
    lines.append(
        f"  seconds: CPU time on this machine, from the cost model calibrated here in "
        f"{plan.calibration_seconds:.2f} s (ww_monitor.monitoring.cost)"
    )
    if sampled:
        lines.append(
            f"  {est}: wwm.analyze's sampled estimate for matrices whose smaller side exceeds "
            f"{plan.estimate_above} (the monitor analyses whole matrices)"
        )
    elif plan.estimate_above is not None:
        lines.append(f"  {est}: no matrix has a smaller side above {plan.estimate_above}")
    groups: dict = {}  # the shapes table: one row per (kind, shape, dtype, carried forward)
    for m in plan.matrices:
        groups.setdefault((m.kind + (" (frozen)" if m.rank is None else ""), m.shape, m.dtype), []).append(m)
    head = ("kind", "shape", "dtype", "count", "bytes each", "s each") + ((f"s each, {est}",) if sampled else ())
    rows = [head]
    for (kind, shape, dtype), ms in groups.items():
        row = (kind, _shape(shape), dtype, str(len(ms)), _size(ms[0].nbytes), f"{ms[0].seconds:.3g}")
        rows.append(row + ((f"{ms[0].sampled_seconds:.3g}",) if sampled else ()))
    lines += ["", *_table(rows, right_from=3)]
    rows = [("rank", "matrices", "bytes copied", "analysis s") + ((f"s, {est}",) if sampled else ())]
    per_rank = zip(plan.matrices_per_rank, plan.bytes_per_rank, plan.seconds_per_rank, plan.sampled_seconds_per_rank)
    totals = (
        "all",
        str(sum(plan.matrices_per_rank)),
        _size(sum(plan.bytes_per_rank)),
        _num(sum(plan.seconds_per_rank)),
        _num(sum(plan.sampled_seconds_per_rank)),
    )
    for rank_row in [(str(r), str(c), _size(b), _num(s), _num(e)) for r, (c, b, s, e) in enumerate(per_rank)] + (
        [totals] if plan.ranks > 1 else []
    ):
        rows.append(rank_row if sampled else rank_row[:4])
    lines += ["", *_table(rows, right_from=1)]
    lines += ["", *_schedule_lines(plan, est if sampled else None)]
    if plan.skipped:
        lines += ["", f"skipped ({len(plan.skipped)}):"]
        lines += [f"  {s.name} [{_shape(s.shape)}]: {s.reason}" for s in plan.skipped]
    return "\n".join(part for line in lines for part in _fit(line))


def _schedule_lines(plan: CostPlan, est: str | None) -> list[str]:
    """The per-snapshot cost and the schedule within the budget (``est``: the sampled column's name)."""
    cost = plan.snapshot_seconds()
    if cost is None:
        return [
            "schedule: not suggested (the GPU analysis time is unmeasured); on this CPU one snapshot "
            f"would take {_secs(max(plan.seconds_per_rank, default=0.0))} on the slowest rank"
        ]
    copy = max((b / plan.copy_bytes_per_second for b in plan.bytes_per_rank), default=0.0)
    lines = [
        f"one snapshot, slowest rank: {_secs(cost)} (copy {_secs(copy)} + analysis)"
        + (f"; {est}: {_secs(plan.snapshot_seconds(sampled=True))}" if est else "")
    ]
    step = f"{plan.step_seconds:g} s per step" + (
        " (assumed; pass --step-seconds)" if plan.step_seconds_assumed else ""
    )
    if plan.max_overhead is None:
        lines.append("schedule: max_overhead=None: every scheduled snapshot is taken")
    else:
        gap = plan.seconds_between_snapshots()
        assert gap is not None  # the snapshot cost and max_overhead are both known here
        lines.append(
            f"schedule within max_overhead={plan.max_overhead:g}: at most one snapshot per {_secs(gap)} of training"
        )
        lines.append(f"  = every_n_train_steps >= {plan.suggested_every_n_train_steps():,} at {step}")
        if plan.steps_per_epoch:
            lines.append(
                f"  = every_n_epochs >= {math.ceil(gap / (plan.steps_per_epoch * plan.step_seconds)):,} "
                f"at {plan.steps_per_epoch:,} steps per epoch"
            )
        if est:
            lines.append(
                f"  {est}: one per {_secs(plan.seconds_between_snapshots(sampled=True))} "
                f"(every_n_train_steps >= {plan.suggested_every_n_train_steps(sampled=True):,})"
            )
    share = plan.scheduled_overhead()
    if share is not None:
        verdict = (
            "fits"
            if plan.max_overhead is None or share <= plan.max_overhead
            else "over max_overhead: the budget defers snapshots to the interval above"
        )
        lines.append(f"requested schedule: {share:.1%} of the training time ({verdict})")
    elif plan.every_n_epochs is not None and plan.every_n_train_steps is None:
        lines.append("requested schedule: every_n_epochs is checked with --steps-per-epoch")
    if plan.frozen:
        lines.append(
            f"the baseline is always taken: {_secs(plan.snapshot_seconds(baseline=True))} with the frozen "
            f"matrices; the final snapshot: {_secs(cost)}"
        )
    else:
        lines.append(f"the baseline and the final snapshot are always taken: {_secs(cost)} each")
    return lines


def _table(rows: list[tuple], right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.rjust(w) if i >= right_from else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
    return out


#: Width of the text output: every line fits a 100-column terminal.
MAX_COLUMNS = 100


def _fit(line: str) -> list[str]:
    """``line``, wrapped at :data:`MAX_COLUMNS` with its indent plus two spaces on continuations."""
    if len(line) <= MAX_COLUMNS:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 2)
    return textwrap.wrap(line, MAX_COLUMNS, subsequent_indent=indent, break_on_hyphens=False)
