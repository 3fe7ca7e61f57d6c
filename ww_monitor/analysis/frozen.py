"""Which weight matrices are frozen: :func:`parameters_read` and :func:`is_frozen`.

A matrix is **frozen** when it reads at least one registered parameter and none of the
parameters it reads requires grad: training cannot change it (a frozen backbone or embedding,
the base weights under LoRA adapters, a layer before its turn in gradual unfreezing). The
parameters a matrix reads:

* a plain weight: the parameter itself (conv kernels, the q/k/v rows of ``in_proj_weight`` and
  the gate rows of an RNN weight are views of one parameter);
* a parametrized weight (``torch.nn.utils.parametrizations``): every parameter of its
  parametrization list (``original``, or ``original0``/``original1``, and any the
  parametrizations hold); an old-style ``spectral_norm``/``weight_norm`` hook: the module's
  ``<name>_*`` parameters (``weight_orig``, ``weight_g``, ``weight_v``);
* a LoRA update ``scaling * B @ A``: ``lora_A`` and ``lora_B`` (and the base weight for the merged
  ``W + scaling * B @ A``), set by :mod:`.adapters`.

A tied tensor is one parameter, so it is frozen only if that parameter does not require grad.
A weight that is not a registered parameter (a buffer, a quantized module's packed weight, a
state dict's tensor) has no known parameters and is **never** called frozen: without positive
knowledge the monitor keeps watching it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
from torch import nn

from .weight_access import _old_style_hook

__all__ = ["parameters_read", "is_frozen"]


def parameters_read(module: nn.Module, name: str = "weight") -> tuple[torch.Tensor, ...]:
    """The registered parameters ``module.<name>`` is computed from (see the module docstring);
    ``()`` when it is not built from parameters."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        return tuple(cast(nn.ModuleDict, module.parametrizations)[name].parameters())  # set by parametrize
    if _old_style_hook(module, name) is not None:
        return tuple(p for n, p in module.named_parameters(recurse=False) if n.startswith(name + "_"))
    p = getattr(module, "_parameters", {}).get(name)
    return (p,) if p is not None else ()


def is_frozen(params: Iterable[torch.Tensor]) -> bool:
    """True when ``params`` (the parameters one matrix reads) is not empty and none requires grad."""
    params = tuple(params)
    return bool(params) and not any(p.requires_grad for p in params)
