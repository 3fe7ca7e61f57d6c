"""Where the callback analyses, and the CUDA streams and events it uses, in one place.

Everything device-specific goes through these few functions, so the analysis code is the same
on CPU and GPU: on CPU every stream is ``None`` and every stream operation is a no-op; on CUDA

* snapshot copies run on a per-device *copy stream* (default priority: the next optimizer step
  waits for them on the device, without a host synchronisation);
* eigensolves run on a per-device *analysis stream* of the lowest priority, so the GPU
  scheduler prefers the training kernels whenever both are ready;
* the analysis never holds more than :data:`DEVICE_MEMORY_FRACTION` of the device memory that
  was free when it started (the snapshot copy plus each streamed group's float64 working set);
  an out-of-memory error sends that analysis back to the CPU with a warning.
"""

from __future__ import annotations

import contextlib
import re

import torch

from ..errors import WWMonitorError

__all__ = [
    "DEVICE_MEMORY_FRACTION",
    "validate_analysis_device",
    "resolve_analysis_device",
    "staging_budget",
    "copy_stream",
    "analysis_stream",
    "on_stream",
    "record_event",
    "is_out_of_memory",
]

#: Share of the *free* device memory the analysis may use (snapshot copy + float64 working set
#: of one streamed group). Training keeps the other 75% of what was free plus everything it
#: already held; a quarter still fits a 7B model's largest matrix group many times over.
DEVICE_MEMORY_FRACTION = 0.25

_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_COPY_STREAMS: dict = {}
_ANALYSIS_STREAMS: dict = {}


def validate_analysis_device(spec) -> str:
    """``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; a CUDA device must exist."""
    if not isinstance(spec, str) or not _DEVICE_SPEC.match(spec):
        raise WWMonitorError(f"`analysis_device` must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}.")
    if spec.startswith("cuda"):
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            raise WWMonitorError(f"`analysis_device` is {spec!r} but that CUDA device is not available.")
    return spec


def resolve_analysis_device(spec: str, weights_device) -> torch.device:
    """``"auto"``: the weights' device if it is a GPU, else the CPU; otherwise ``spec`` itself."""
    if spec == "auto":
        dev = torch.device(weights_device) if weights_device is not None else torch.device("cpu")
        return dev if dev.type == "cuda" else torch.device("cpu")
    return torch.device(spec)


def staging_budget(device: torch.device) -> int | None:
    """Bytes the analysis may hold on ``device`` now; ``None`` on the CPU (no device budget)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_MEMORY_FRACTION)


def _stream(cache: dict, device: torch.device, priority: int):
    if device.type != "cuda":
        return None
    stream = cache.get(device)
    if stream is None:
        stream = cache[device] = torch.cuda.Stream(device=device, priority=priority)
    return stream


def copy_stream(device: torch.device):
    """The side stream snapshot copies run on (default priority), ``None`` off CUDA."""
    return _stream(_COPY_STREAMS, device, 0)


def analysis_stream(device: torch.device):
    """The lowest-priority stream eigensolves run on, ``None`` off CUDA.

    CUDA's lowest priority is also the default one, so training kernels are never queued behind
    the analysis; streams the training creates with a higher priority go first.
    """
    if device.type != "cuda":
        return None
    low, _high = torch.cuda.Stream.priority_range()  # type: ignore[call-arg]  # a staticmethod; torch's stub omits it
    return _stream(_ANALYSIS_STREAMS, device, low)


@contextlib.contextmanager
def on_stream(stream):
    """Run the block's device work on ``stream`` (no-op for ``None``)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(stream):
        yield


def record_event(stream):
    """An event marking the work queued on ``stream`` so far (``None`` off CUDA)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def is_out_of_memory(err) -> bool:
    """True for a device (or host) allocation failure, given the exception or its message."""
    if isinstance(err, str):
        return "out of memory" in err.lower()
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(err, (MemoryError, oom)) or "out of memory" in str(err).lower()
