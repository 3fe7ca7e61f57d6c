"""The analysis job a worker runs for one snapshot, and what it returns.

:func:`analyze_snapshot` analyses every matrix of a :class:`~ww_monitor.monitoring.snapshot.Snapshot`
in memory-bounded groups (:func:`analyze_on_device`: on the CPU or a GPU, falling back to the CPU
on out-of-memory), adds ``distance_from_init`` against the baseline, bins the ESD histograms, and
returns an :class:`AnalysisOutput`. It runs in any worker of :mod:`ww_monitor.monitoring.worker`.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ..analysis.results import LayerResult, SkippedLayer
from .device import analysis_stream, is_out_of_memory, on_stream, staging_budget
from .snapshot import Snapshot

__all__ = [
    "AnalysisOutput",
    "CHUNK_BYTES",
    "analyze_snapshot",
    "analyze_on_device",
    "run_with_cpu_fallback",
    "failed_analysis",
]


@dataclass
class AnalysisOutput:
    """One rank's analysis of one snapshot (its share of the layers)."""

    index: int
    step: int
    epoch: int
    rank: int
    results: list[LayerResult] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    seconds: float = 0.0
    nbytes: int = 0
    error: str | None = None
    #: ESD histograms by layer name, binned here so the training thread only writes them.
    histograms: dict[str, Any] = field(default_factory=dict)


#: The analysis is fed groups of matrices whose float64 copies stay below this many bytes.
#: Small layers still share batched eigensolver calls, while the float64 working memory
#: (stacked copy, Gram matrix, eigensolver workspace) stays a small multiple of one group
#: instead of the whole model.
CHUNK_BYTES = 32 * 1024 * 1024


def _chunks(matrices, limit: int):
    group: list = []
    size = 0
    for m in matrices:
        b = m.weight.numel() * 8
        if group and size + b > limit:
            yield group
            group, size = [], 0
        group.append(m)
        size += b
    if group:
        yield group


def analyze_snapshot(
    snapshot: Snapshot,
    config,
    rank: int = 0,
    chunk_bytes: int = CHUNK_BYTES,
    histograms: bool = False,
    baseline: dict | None = None,
    device: str | None = None,
) -> AnalysisOutput:
    """The analysis job: metrics of every matrix in ``snapshot`` (and, with ``histograms``, the
    binned ESD of each for TensorBoard); frees the snapshot's buffers when done. With
    ``baseline`` ({layer: weights at the baseline snapshot}) each result also gets
    ``distance_from_init = ||W - W_0||_F / ||W_0||_F``. ``device`` (e.g. ``"cuda:0"``) runs the
    eigensolves there (:func:`analyze_on_device`)."""
    from ..functional.distances import relative_distance
    from ..functional.histogram import esd_histogram

    t0 = time.perf_counter()
    nbytes = snapshot.nbytes
    try:
        with torch.no_grad():
            matrices = snapshot.matrices()
            results, skipped = analyze_on_device(matrices, config, torch.device(device or "cpu"), chunk_bytes)
            if baseline:
                current = {m.name: m.weight for m in matrices}
                for r in results:
                    ref = baseline.get(r.name)
                    if ref is not None and r.name in current and tuple(ref.shape) == tuple(current[r.name].shape):
                        r.distance_from_init = relative_distance(ref, current[r.name])
    finally:
        snapshot.release()
    hists = {r.name: esd_histogram(r.eigenvalues) for r in results} if histograms else {}
    return AnalysisOutput(
        index=snapshot.index,
        step=snapshot.step,
        epoch=snapshot.epoch,
        rank=rank,
        results=results,
        skipped=skipped,
        seconds=time.perf_counter() - t0,
        nbytes=nbytes,
        histograms=hists,
    )


def analyze_on_device(matrices, config, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
    """Analyse ``matrices`` in groups on ``device``; only eigenvalues come back to the host.

    Groups are bounded by ``chunk_bytes`` of float64 copies and, on a GPU, by half of the
    staging budget (:func:`~ww_monitor.monitoring.device.staging_budget`: the copy plus its Gram and
    workspace). Each group is moved to the device (if the snapshot is elsewhere) and solved on
    the low-priority analysis stream. An out-of-memory failure sends that group and the rest of
    the snapshot to the CPU, with a warning.
    """
    from ..analysis.analyze import analyze_matrices

    budget = staging_budget(device)
    limit = chunk_bytes if budget is None else max(1, min(chunk_bytes * _DEVICE_CHUNK_FACTOR, budget // 2))
    stream = analysis_stream(device)
    cpu = torch.device("cpu")
    results, skipped = [], []
    for group in _chunks(matrices, limit):
        if device != cpu:

            def on_device(group=group, device=device):
                with on_stream(stream):
                    res, skip = analyze_matrices([_moved(m, device) for m in group], config)
                # analyze_matrices reports a failed eigensolve as a skipped layer: an OOM among them
                # means the group did not fit, not that the weights are bad.
                oom = [s.reason for s in skip if is_out_of_memory(s.reason)]
                if oom:
                    raise MemoryError(oom[0])
                return res, skip

            out = run_with_cpu_fallback(on_device, str(device))
            if out is None:
                device = cpu
        if device == cpu:
            out = analyze_matrices([_moved(m, cpu) for m in group], config)
        results.extend(out[0])
        skipped.extend(out[1])
    return results, skipped


#: On a GPU a group may hold this many times ``CHUNK_BYTES``: bigger batches keep the device busy
#: (within the staging budget, which bounds it first on small cards).
_DEVICE_CHUNK_FACTOR = 8


def run_with_cpu_fallback(job, where: str):
    """``job()``, or ``None`` with a warning when it ran out of memory (the caller goes to CPU)."""
    try:
        return job()
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        warnings.warn(
            f"ww_monitor: the analysis ran out of memory on {where}; the rest of this snapshot is "
            f"analysed on the CPU ({type(err).__name__}: {err}).",
            RuntimeWarning,
            stacklevel=2,
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _moved(m, device: torch.device):
    import dataclasses

    if m.weight.device == device:
        return m
    # Everything but the weight carries over (aliases, stored dtype, frozen).
    return dataclasses.replace(m, weight=m.weight.to(device, non_blocking=True))


def failed_analysis(index: int, step: int, epoch: int, rank: int, error: str) -> AnalysisOutput:
    """The result of a snapshot that could not be taken (so every rank still reports it)."""
    return AnalysisOutput(index=index, step=step, epoch=epoch, rank=rank, error=error)
