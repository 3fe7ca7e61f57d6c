"""The array types the functional API takes (type aliases only: nothing here runs)."""

from __future__ import annotations

import torch
from numpy.typing import ArrayLike

__all__ = ["Matrix", "Eigenvalues"]

#: A weight matrix (or a k x rows x cols stack): a torch tensor, or anything NumPy reads as an array.
Matrix = torch.Tensor | ArrayLike
#: Eigenvalues: a 1-D NumPy array, list or CPU tensor of numbers.
Eigenvalues = ArrayLike
