"""Eigenvalues of W^T W (squared singular values of W), batched.

Two exact (float64) strategies and one mixed-precision one:

* ``"gram"``: form the M x M Gram matrix W^T W in float64 (after orienting so M <= N) and take
  its symmetric eigenvalues. One rank-k update (only the lower triangle, which is all the
  eigensolver reads) plus a symmetric eigensolve: 1.6-3.4x faster than an SVD on CPU (see
  ``benchmarks/bench_eigensolver.py``). Squaring the matrix costs precision only below
  ~ M * eps(float64) * lambda_max; float32/bf16/fp16 weights carry ~ eps(float32) relative
  error already, a million times more, so for them the Gram route loses nothing measurable.
* ``"svd"``: ``torch.linalg.svdvals`` in float64, squared. Used for float64 weights by
  ``"auto"``, whose own precision is finer than the Gram floor.
* ``"mixed"``: the exact float64 Gram, a float32 eigensolve, the rank decided in float64, and a
  float64 solve for shapes whose rank float32 cannot decide (see :mod:`.gram`); the absolute
  error bound comes back through ``errors=``. Used by ``"auto"`` for float32/16-bit weights with
  M >= :data:`MIXED_MIN_M` on the CPU route.

On CPU the Gram route calls LAPACK through SciPy (``dsyrk`` + ``dsyevd``, one matrix at a time,
no copy beyond the float64 upcast, eigenvalues only with the blocked workspace: see :mod:`.gram`):
on the benchmark machine (AMD EPYC) numpy/SciPy's OpenBLAS
runs it 1.2-1.5x faster than the MKL bundled with PyTorch wheels, which is known to pick slower
code paths on non-Intel CPUs (``bench_eigensolver.py`` prints both; :data:`CPU_BACKEND` switches).
Elsewhere (CUDA) matrices of the same shape are stacked and solved in one batched ``torch`` call
(less per-layer dispatch overhead, the device stays busy) and nothing leaves the device but the
eigenvalues.

Non-finite weights are detected for free on the Gram route (a NaN/Inf entry makes its column's
diagonal Gram entry non-finite), so callers need no separate O(N M) ``isfinite`` pass:
``check_finite=True`` returns ``None`` for such matrices instead of raising.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .array_types import Matrix
from .gram import MIXED_ERROR_FACTOR, RoutePlan, blas_threads, cpu_gram_eigenvalues, gram_noise_floor

__all__ = [
    "eigenvalues",
    "batched_eigenvalues",
    "choose_method",
    "gram_noise_floor",
    "MIXED_ERROR_FACTOR",
    "METHODS",
    "CPU_BACKENDS",
]

METHODS = ("auto", "gram", "svd", "mixed")
#: LAPACK used by the CPU Gram route: ``"scipy"`` (numpy/SciPy's OpenBLAS) or ``"torch"`` (the
#: LAPACK bundled with PyTorch, MKL in the x86 wheels). Both are exact float64 solvers; they agree
#: to ~1e-15 lambda_max. ``"scipy"`` is the default because it was faster at every measured shape
#: (``benchmarks/bench_eigensolver.py --quick``, one thread, AMD EPYC: 1.2-1.5x less CPU time).
CPU_BACKENDS = ("scipy", "torch")
CPU_BACKEND = "scipy"

#: ``"auto"`` solves float32/16-bit matrices with M >= MIXED_MIN_M in mixed precision (see
#: :mod:`.gram`): there the float32 eigensolve cuts the CPU time per shape by 6-19%
#: (``bench_eigensolver.py --quick``: 768x768 and FFN 3072x768 1.19x, 4096x1024 1.17x, 512x512
#: conv slices 1.06x); below it the float64 solve costs a few ms and stays exact (smaller
#: matrices' ESDs match an SVD's to ~1e-13 lambda_max, as ``tests/test_parity_weightwatcher.py``
#: checks on M = 320).
MIXED_MIN_M = 512
# Keep each batched float64 stack below this many bytes (torch route). On CPU a batch only saves
# Python and dispatch overhead (LAPACK loops over it anyway), and buffers under glibc's 32 MiB
# mmap ceiling are recycled from the heap instead of being page-faulted in afresh on every call.
# On CUDA bigger batches keep the device busy.
_BATCH_BYTES = 24 * 1024 * 1024
_BATCH_BYTES_CUDA = 256 * 1024 * 1024

# Recursion depth of the lower-triangle Gram product (see _gram_lower): 2 levels cut the GEMM
# flops to 62.5%; deeper levels save little more and make the blocks too small for BLAS.
_GRAM_SPLIT_DEPTH = 2
# Column blocks narrower than this are multiplied whole: smaller GEMMs lose more than they save.
_GRAM_MIN_BLOCK = 192


def choose_method(dtype: torch.dtype, method: str = "auto", m: int | None = None) -> str:
    """Resolve ``"auto"``: ``"svd"`` for float64 weights; ``"mixed"`` for lower precision with
    M >= :data:`MIXED_MIN_M` (``m``, the smaller side; CPU SciPy route only); else ``"gram"``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    if dtype == torch.float64:
        return "svd"
    return "mixed" if m is not None and m >= MIXED_MIN_M else "gram"


def _as_tensor(w: Matrix) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.detach()
    return torch.as_tensor(np.asarray(w))


def eigenvalues(w: Matrix, method: str = "auto") -> np.ndarray:
    """Sorted (ascending) eigenvalues of W^T W for one 2-D matrix, as float64 numpy."""
    t = _as_tensor(w)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
    return batched_eigenvalues([t], method=method)[0]


def _orient(t: torch.Tensor) -> torch.Tensor:
    # Eigenvalues of W^T W with W tall (N >= M) give the M nonzero squared singular values.
    return t.transpose(-1, -2) if t.shape[-2] < t.shape[-1] else t


def batched_eigenvalues(
    mats: Sequence, method: str = "auto", *, check_finite: bool = False, errors: list | None = None
) -> list:
    """Eigenvalues for many matrices (2-D, or 3-D stacks of slices whose eigenvalues pool).

    Each input may be a 2-D (rows x cols) matrix or a 3-D (k x rows x cols) stack, whose
    k * min(rows, cols) eigenvalues are returned together. Output order matches input order;
    each array is float64, sorted ascending, clipped at 0 (eigvalsh can return -1e-17).

    Non-finite weights (NaN/Inf) raise ``ValueError``; with ``check_finite=True`` their entry is
    ``None`` instead and the other matrices are still solved. ``errors``, if given, receives one
    absolute error bound per matrix: 0.0 for the float64 solvers (exact to ~1e-15 lambda_max),
    the float32 solver's bound for ``"mixed"`` (see :mod:`.gram`).
    """
    tensors = [_as_tensor(m) for m in mats]
    for t in tensors:
        if t.ndim not in (2, 3):
            raise ValueError(f"expected 2-D or 3-D weights, got shape {tuple(t.shape)}")
    out: list = [None] * len(tensors)
    bounds = [0.0] * len(tensors)
    on_torch: list[int] = []
    cpu_gram: list[int] = []
    for i, t in enumerate(tensors):
        meth = choose_method(t.dtype, method, min(t.shape[-2:]))
        if t.device.type == "cpu" and CPU_BACKEND == "scipy" and meth in ("gram", "mixed"):
            cpu_gram.append(i)
        elif bool(torch.isfinite(t).all()):
            on_torch.append(i)
    if cpu_gram:
        plan = RoutePlan()  # shared by the whole call: same-shape matrices take the same route
        with blas_threads(torch.get_num_threads()):
            for i in cpu_gram:
                mixed = choose_method(tensors[i].dtype, method, min(tensors[i].shape[-2:])) == "mixed"
                out[i], bounds[i] = cpu_gram_eigenvalues(tensors[i], mixed, plan)
    if on_torch:
        for i, ev in zip(on_torch, _torch_eigenvalues([tensors[i] for i in on_torch], method)):
            out[i] = ev
    if not check_finite and any(ev is None for ev in out):
        raise ValueError("non-finite weights (NaN or Inf)")
    if errors is not None:
        errors.extend(bounds)
    return out


def _torch_eigenvalues(tensors: Sequence[torch.Tensor], method: str) -> list[np.ndarray]:
    """torch route (CUDA, ``"svd"``, or ``CPU_BACKEND = "torch"``): batched by shape."""
    # Group slices by (device, oriented shape, method) so each group is one batched call.
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        stack = t if t.ndim == 3 else t.unsqueeze(0)
        stack = _orient(stack)
        meth = choose_method(t.dtype, method)
        key = (stack.device, tuple(stack.shape[-2:]), "gram" if meth == "mixed" else meth)  # float64 here
        groups.setdefault(key, []).append((i, stack))

    out: list[list[torch.Tensor]] = [[] for _ in tensors]
    for (device, (n, m), meth), members in groups.items():
        per_slice = n * m * 8 + m * m * 8
        budget = _BATCH_BYTES_CUDA if device.type == "cuda" else _BATCH_BYTES
        batch = max(1, budget // per_slice)
        # Flatten to a list of (owner, slice-stack) chunks no larger than `batch` slices.
        pending: list[tuple[int, torch.Tensor]] = []
        count = 0
        for owner, stack in members:
            for lo in range(0, stack.shape[0], batch):
                piece = stack[lo : lo + batch]
                if count + piece.shape[0] > batch and pending:
                    _solve(pending, meth, out)
                    pending, count = [], 0
                pending.append((owner, piece))
                count += piece.shape[0]
        if pending:
            _solve(pending, meth, out)

    result = []
    for parts in out:
        ev = torch.cat(parts).cpu().numpy() if len(parts) > 1 else parts[0].cpu().numpy()
        ev = np.sort(ev)
        np.maximum(ev, 0.0, out=ev)
        result.append(ev)
    return result


def _solve(pending: list[tuple[int, torch.Tensor]], method: str, out: list[list[torch.Tensor]]) -> None:
    big = _gather_float64(pending)
    if method == "gram":
        # The row-major lower triangle is the column-major upper one, the layout LAPACK works in;
        # MKL's upper-storage tridiagonal reduction (dsytrd 'U') is 15-25% faster than 'L' at
        # these sizes. Same matrix, so the eigenvalues agree to rounding (~1e-14 lambda_max).
        ev = torch.linalg.eigvalsh(_gram_lower(big).transpose(-1, -2), UPLO="U")
    else:
        ev = torch.linalg.svdvals(big).square()
    pos = 0
    for owner, piece in pending:
        k = piece.shape[0]
        out[owner].append(ev[pos : pos + k].reshape(-1))
        pos += k


def _gather_float64(pending: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """One contiguous float64 (k, n, m) stack of all pieces: upcast and gather in a single copy."""
    if len(pending) == 1 and pending[0][1].dtype == torch.float64:
        return pending[0][1]  # neither solver writes to its input
    first = pending[0][1]
    total = sum(p.shape[0] for _, p in pending)
    big = torch.empty((total, *first.shape[-2:]), dtype=torch.float64, device=first.device)
    pos = 0
    for _, piece in pending:
        big[pos : pos + piece.shape[0]].copy_(piece)
        pos += piece.shape[0]
    return big


def _gram_lower(a: torch.Tensor) -> torch.Tensor:
    """Lower triangle of the batched Gram matrices ``a^T a`` (above it: zeros or don't-cares).

    ``eigvalsh`` reads only one triangle, so the products above the diagonal need not be
    formed. Splitting the columns in halves recursively,

        [A1 A2]^T [A1 A2] = [[A1^T A1, .], [A2^T A1, A2^T A2]],

    skips the upper off-diagonal block at each level: depth ``_GRAM_SPLIT_DEPTH`` does
    1/2 + 1/2^(depth+1) of the full GEMM's flops (62.5% at depth 2), as BLAS ``syrk`` would.
    Every entry is still one dot product over the same rows by the same GEMM kernel, so the
    lower triangle matches the full ``a^T a``'s (bitwise on the shapes of
    ``benchmarks/bench_eigensolver.py``). The zero fill costs < 1% of the eigensolve and keeps
    the unused entries free of garbage (NaN) whatever a solver might do with them.
    """
    m = a.shape[-1]
    gram = torch.zeros((*a.shape[:-2], m, m), dtype=a.dtype, device=a.device)
    _fill_gram_lower(a, gram, 0, m, _GRAM_SPLIT_DEPTH)
    return gram


def _fill_gram_lower(a: torch.Tensor, gram: torch.Tensor, lo: int, hi: int, depth: int) -> None:
    width = hi - lo
    if depth == 0 or width < 2 * _GRAM_MIN_BLOCK:
        block = a[..., lo:hi]
        gram[..., lo:hi, lo:hi] = block.transpose(-1, -2) @ block
        return
    mid = lo + width // 2
    gram[..., mid:hi, lo:mid] = a[..., mid:hi].transpose(-1, -2) @ a[..., lo:mid]
    _fill_gram_lower(a, gram, lo, mid, depth - 1)
    _fill_gram_lower(a, gram, mid, hi, depth - 1)
