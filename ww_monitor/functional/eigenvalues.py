"""Eigenvalues of W^T W (squared singular values of W), exact, in float64, batched.

Two exact strategies:

* ``"gram"``: form the M x M Gram matrix W^T W in float64 (after orienting so M <= N) and take
  ``torch.linalg.eigvalsh``. One GEMM (only its lower triangle, which is all ``eigvalsh`` reads)
  plus a symmetric eigensolve: 1.6-3.4x faster than an SVD on CPU (see
  ``benchmarks/bench_eigensolver.py``). Squaring the matrix costs precision only below
  ~ M * eps(float64) * lambda_max; float32/bf16/fp16 weights carry ~ eps(float32) relative
  error already, a million times more, so for them the Gram route loses nothing measurable.
* ``"svd"``: ``torch.linalg.svdvals`` in float64, squared. Used for float64 weights by
  ``"auto"``, whose own precision is finer than the Gram floor.

Matrices of the same shape are stacked and solved in one batched call (less per-layer Python
and dispatch overhead). Work happens on the tensors' device, so CUDA weights stay on CUDA.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["eigenvalues", "batched_eigenvalues", "choose_method", "gram_noise_floor", "METHODS"]

METHODS = ("auto", "gram", "svd")

# Keep each batched float64 stack below this many bytes. On CPU a batch only saves Python and
# dispatch overhead (LAPACK loops over it anyway), and buffers under glibc's 32 MiB mmap ceiling
# are recycled from the heap instead of being page-faulted in afresh on every call (~5% of
# analyze time on BERT-sized layers). On CUDA bigger batches keep the device busy.
_BATCH_BYTES = 24 * 1024 * 1024
_BATCH_BYTES_CUDA = 256 * 1024 * 1024

# Recursion depth of the lower-triangle Gram product (see _gram_lower): 2 levels cut the GEMM
# flops to 62.5%; deeper levels save little more and make the blocks too small for BLAS.
_GRAM_SPLIT_DEPTH = 2
# Column blocks narrower than this are multiplied whole: smaller GEMMs lose more than they save.
_GRAM_MIN_BLOCK = 192


def choose_method(dtype: torch.dtype, method: str = "auto") -> str:
    """Resolve ``"auto"``: Gram + eigvalsh unless the weights are float64 (then svdvals)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "auto":
        return method
    return "svd" if dtype == torch.float64 else "gram"


def gram_noise_floor(lambda_max: float, m: int) -> float:
    """Absolute error of Gram eigenvalues: ~ M * eps(float64) * lambda_max (Wilkinson bound)."""
    return float(lambda_max) * m * float(np.finfo(np.float64).eps)


def _as_tensor(w) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w.detach()
    return torch.as_tensor(np.asarray(w))


def eigenvalues(w, method: str = "auto") -> np.ndarray:
    """Sorted (ascending) eigenvalues of W^T W for one 2-D matrix, as float64 numpy."""
    t = _as_tensor(w)
    if t.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(t.shape)}")
    return batched_eigenvalues([t], method=method)[0]


def _orient(t: torch.Tensor) -> torch.Tensor:
    # Eigenvalues of W^T W with W tall (N >= M) give the M nonzero squared singular values.
    return t.transpose(-1, -2) if t.shape[-2] < t.shape[-1] else t


def batched_eigenvalues(mats: Sequence, method: str = "auto") -> list[np.ndarray]:
    """Eigenvalues for many matrices (2-D, or 3-D stacks of slices whose eigenvalues pool).

    Each input may be a 2-D (rows x cols) matrix or a 3-D (k x rows x cols) stack, whose
    k * min(rows, cols) eigenvalues are returned together. Output order matches input order;
    each array is float64, sorted ascending, clipped at 0 (eigvalsh can return -1e-17).
    """
    tensors = [_as_tensor(m) for m in mats]
    for t in tensors:
        if t.ndim not in (2, 3):
            raise ValueError(f"expected 2-D or 3-D weights, got shape {tuple(t.shape)}")
    # Group slices by (device, oriented shape, method) so each group is one batched call.
    groups: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for i, t in enumerate(tensors):
        stack = t if t.ndim == 3 else t.unsqueeze(0)
        stack = _orient(stack)
        key = (stack.device, tuple(stack.shape[-2:]), choose_method(t.dtype, method))
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
