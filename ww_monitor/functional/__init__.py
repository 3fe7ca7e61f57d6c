"""Pure functions: arrays in, numbers out, no state (torchmetrics' ``functional`` style)."""

from .balancing import balance_factors, linear_factors, log2_factors, sigmoid_factors, sqrt_factors, step_factors
from .eigenvalues import batched_eigenvalues, eigenvalues
from .hill import hill_alpha
from .power_law import PowerLawFit, fit_power_law
from .spectral_metrics import alpha_metrics, matrix_entropy, matrix_rank, norm_metrics, rank_tolerance

__all__ = [
    "PowerLawFit",
    "alpha_metrics",
    "balance_factors",
    "batched_eigenvalues",
    "eigenvalues",
    "fit_power_law",
    "hill_alpha",
    "linear_factors",
    "log2_factors",
    "matrix_entropy",
    "matrix_rank",
    "norm_metrics",
    "rank_tolerance",
    "sigmoid_factors",
    "sqrt_factors",
    "step_factors",
]
