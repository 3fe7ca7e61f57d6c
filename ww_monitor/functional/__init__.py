"""Pure functions: arrays in, numbers out, no state (torchmetrics' ``functional`` style)."""

from .eigenvalues import batched_eigenvalues, eigenvalues
from .power_law import PowerLawFit, fit_power_law
from .spectral_metrics import alpha_metrics, matrix_entropy, matrix_rank, norm_metrics, rank_tolerance

__all__ = [
    "PowerLawFit",
    "alpha_metrics",
    "batched_eigenvalues",
    "eigenvalues",
    "fit_power_law",
    "matrix_entropy",
    "matrix_rank",
    "norm_metrics",
    "rank_tolerance",
]
