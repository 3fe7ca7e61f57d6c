"""Consistent copies of the selected weight matrices, taken on the training thread.

A :class:`Snapshot` owns one flat buffer per (chunk, dtype) holding every selected matrix
back to back; :meth:`Snapshot.matrices` rebuilds :class:`~ww_monitor.analysis.layers.LayerMatrix`
views over it for the analysis. One buffer per dtype (instead of one tensor per layer) keeps
allocation cheap, makes the memory held by a snapshot exact (``nbytes`` equals the analysed
weights' size: at most one copy per snapshot in flight) and lets a process worker receive the
whole snapshot through a single shared-memory segment.

The copy is made by the callback in a hook that runs between optimizer steps (after the
step and before the next one), under :func:`torch.no_grad`:

* CPU weights: a plain copy into the buffer (``Tensor.copy_``), finished when
  :func:`take_snapshot` returns.
* CUDA weights: the copy into *pinned* host buffers runs asynchronously on a side stream that
  first waits for the current stream (so it sees the weights after the optimizer step). The
  training thread does not wait for it. With ``device=`` (the callback's ``analysis_device``
  on a GPU) the buffers stay on that device instead, as long as they fit ``device_budget``
  bytes (:func:`~ww_monitor.monitoring.device.staging_budget`); groups beyond it go to pinned host memory
  and are streamed back to the device for their analysis. Before the next optimizer step may overwrite the
  weights, :meth:`Snapshot.guard_writes` makes the current stream wait for the copy (an
  on-device dependency, no host synchronisation), and the analysis calls :meth:`Snapshot.wait`
  before it reads the buffers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..analysis.layers import LayerMatrix
from .device import copy_stream, on_stream, record_event

__all__ = ["MatrixSpec", "Snapshot", "SnapshotBuilder", "take_snapshot"]


@dataclass(frozen=True)
class MatrixSpec:
    """Where one matrix lives in a snapshot: buffer ``chunk`` (by dtype) at element ``offset``."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    chunk: int
    offset: int
    eig_scale: float = 1.0
    aliases: tuple[str, ...] = ()  # other names of this tied tensor (copied once)
    stored_dtype: torch.dtype | None = None  # see LayerMatrix.stored_dtype
    frozen: bool = False  # see LayerMatrix.frozen

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Snapshot:
    """Copied weights of the selected matrices at one training step."""

    index: int
    step: int
    epoch: int
    specs: list[MatrixSpec] = field(default_factory=list)
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)
    events: list = field(default_factory=list, repr=False)  # (device, CUDA event) of in-flight copies
    taken_at: float = field(default_factory=time.time)
    copy_seconds: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held by the copied weights (host, or device for a device-resident snapshot)."""
        return sum(b.numel() * b.element_size() for chunk in self.buffers for b in chunk.values())

    def __len__(self) -> int:
        return len(self.specs)

    def wait(self) -> None:
        """Block until asynchronous (CUDA) copies into the buffers have finished."""
        for _, ev in self.events:
            ev.synchronize()
        self.events = []

    def guard_writes(self) -> None:
        """Make the current CUDA stream wait for in-flight copies before weights are overwritten.

        Called before the next optimizer step; an on-device dependency, the host does not block.
        """
        for device, ev in self.events:
            torch.cuda.current_stream(device).wait_event(ev)

    def matrices(self) -> list[LayerMatrix]:
        """:class:`LayerMatrix` views over the copied buffers (no further copy)."""
        self.wait()
        out = []
        for s in self.specs:
            flat = self.buffers[s.chunk][s.dtype]
            out.append(
                LayerMatrix(
                    s.name,
                    s.kind,
                    flat[s.offset : s.offset + s.numel].view(s.shape),
                    s.eig_scale,
                    s.aliases,
                    s.stored_dtype,
                    frozen=s.frozen,
                )
            )
        return out

    def release(self) -> None:
        """Drop the copied weights (the metadata stays)."""
        self.wait()
        self.buffers = []

    def __getstate__(self):  # sent to a worker process: finish the copy, drop the events
        self.wait()
        state = dict(self.__dict__)
        state["events"] = []
        return state


def _dtype_key(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class SnapshotBuilder:
    """Builds a :class:`Snapshot` from one or more groups of live matrices.

    Sharded models are materialised one layer (FSDP1: one unit) at a time: each :meth:`add`
    copies one group while its parameters are materialised, into its own buffers.
    """

    def __init__(
        self,
        index: int,
        step: int,
        epoch: int,
        *,
        share_memory: bool = False,
        device: torch.device | None = None,
        device_budget: int | None = None,
    ):
        self.snapshot = Snapshot(index=index, step=step, epoch=epoch)
        self.share_memory = share_memory
        self.device = device if device is not None and device.type == "cuda" and not share_memory else None
        self.device_left = device_budget or 0
        self._slots: dict[str, tuple] = {}  # reserved, not filled yet: name -> (spec, buffers, pin, on device)
        self._t0 = time.perf_counter()

    def add(self, matrices: Sequence[LayerMatrix]) -> None:
        """Copy ``matrices`` (views of live weights) into new buffers, one per dtype."""
        if matrices:
            self._copy(matrices, *self._allocate(matrices, None))

    def reserve(self, matrices: Sequence[LayerMatrix], source: torch.device | None = None) -> None:
        """Allocate the buffers of ``matrices`` now, one per dtype, from their shapes and dtypes
        alone (their weights may be stand-ins); :meth:`fill` copies each in once its weight is at
        hand (a sharded model's layers are gathered one at a time). ``source``: the device the
        weights will come from (pinned or device buffers for CUDA)."""
        if matrices:
            specs, buffers, pin, on_device = self._allocate(matrices, source)
            for spec in specs:
                self._slots[spec.name] = (spec, buffers, pin, on_device)

    def fill(self, m: LayerMatrix) -> None:
        """Copy ``m`` into the slot :meth:`reserve` made for its name."""
        spec, buffers, pin, on_device = self._slots.pop(m.name)
        self._copy([m], [spec], buffers, pin, on_device)

    @property
    def unfilled(self) -> list[str]:
        """Names reserved and not filled yet (their buffers hold no weights)."""
        return list(self._slots)

    def _allocate(self, matrices: Sequence[LayerMatrix], source: torch.device | None):
        snap = self.snapshot
        chunk_index = len(snap.buffers)
        totals: dict[str, int] = {}
        dtypes: dict[str, torch.dtype] = {}
        specs = []
        for m in matrices:
            key = _dtype_key(m.weight.dtype)
            dtypes[key] = m.weight.dtype
            off = totals.get(key, 0)
            spec = MatrixSpec(
                m.name,
                m.kind,
                tuple(m.weight.shape),
                key,
                chunk_index,
                off,
                float(m.eig_scale),
                tuple(m.aliases),
                m.stored_dtype,
                m.frozen,
            )
            totals[key] = off + spec.numel
            specs.append(spec)
        devices = {m.weight.device for m in matrices} if source is None else {torch.device(source)}
        # Pinned host memory lets CUDA copies run asynchronously; a process worker needs shared
        # memory instead (its copies are then synchronous).
        pin = any(d.type == "cuda" for d in devices) and torch.cuda.is_available() and not self.share_memory
        nbytes = sum(total * dtypes[key].itemsize for key, total in totals.items())
        on_device = self.device is not None and nbytes <= self.device_left and devices == {self.device}
        if on_device:
            self.device_left -= nbytes
        buffers = {}
        for key, total in totals.items():
            if on_device:
                buffers[key] = torch.empty(total, dtype=dtypes[key], device=self.device)
                continue
            buf = torch.empty(total, dtype=dtypes[key], pin_memory=pin)
            if self.share_memory:
                buf.share_memory_()
            buffers[key] = buf
        snap.specs.extend(specs)
        snap.buffers.append(buffers)
        return specs, buffers, pin, on_device

    def _copy(self, matrices: Sequence[LayerMatrix], specs, buffers, pin: bool, on_device: bool) -> None:
        with torch.no_grad():
            cuda_jobs = []
            for m, spec in zip(matrices, specs):
                dst = buffers[spec.dtype][spec.offset : spec.offset + spec.numel].view(spec.shape)
                if m.weight.is_cuda and (pin or on_device):
                    cuda_jobs.append((dst, m.weight))
                else:
                    dst.copy_(m.weight.detach())
            if cuda_jobs:
                self._copy_cuda(cuda_jobs)

    def _copy_cuda(self, jobs) -> None:
        by_device: dict = {}
        for dst, src in jobs:
            by_device.setdefault(src.device, []).append((dst, src))
        for device, pairs in by_device.items():
            stream = copy_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with on_stream(stream):
                for dst, src in pairs:
                    dst.copy_(src.detach(), non_blocking=True)
                    # A gathered (sharded) weight is freed right after this call: its memory must
                    # not be reused before the side stream has read it.
                    src.record_stream(stream)
            self.snapshot.events.append((device, record_event(stream)))

    def finish(self) -> Snapshot:
        self.snapshot.copy_seconds = time.perf_counter() - self._t0
        return self.snapshot


def take_snapshot(
    matrices: Iterable[LayerMatrix], *, index: int = 0, step: int = 0, epoch: int = 0, share_memory: bool = False
) -> Snapshot:
    """Copy ``matrices`` (views of live weights) into a new :class:`Snapshot`."""
    builder = SnapshotBuilder(index, step, epoch, share_memory=share_memory)
    builder.add(list(matrices))
    return builder.finish()
