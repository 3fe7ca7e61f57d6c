"""Reading a module's weights without side effects, and turning any stored weight into a matrix.

**Read-only access** (:func:`read_weight`). The monitor must never change the model it watches:

* ``torch.nn.utils.parametrizations`` (``spectral_norm``, ``weight_norm``, ``orthogonal``, and
  user parametrizations): reading ``module.weight`` runs the parametrization's forward, and in
  train mode ``spectral_norm``'s forward runs a power iteration that updates its ``_u``/``_v``
  buffers (so a monitored run would train differently). The weight is instead computed with
  every parametrization module switched to eval mode for the duration of the read (spectral
  norm then divides by ``u^T W v`` with the *stored* vectors), under ``torch.no_grad``; the
  training flags are put back before returning. This is the weight the next forward uses, up
  to the power iteration that forward will run.
* Old-style hooks (``torch.nn.utils.spectral_norm`` / ``weight_norm``): ``module.weight`` is a
  plain attribute left by the last forward (one optimizer step stale); the weight is recomputed
  from the stored tensors with the hook's own ``compute_weight`` (spectral norm without its
  power iteration, which is the only part that writes).
* Quantized modules (``torch.ao`` ``quantize_dynamic``/static ``Linear``, ``Conv``): ``weight``
  is a method returning the quantized tensor; it is called (it only unpacks).

**Weight types** (:func:`analysable`): what the analysis receives for each stored dtype, or
the reason a weight is skipped (never an exception, never a silent drop).
"""

from __future__ import annotations

import contextlib
import re
from typing import cast

import torch
from torch import nn

__all__ = ["read_weight", "analysable", "alias_key", "STANDARD_FLOAT_DTYPES"]

#: Dtypes the eigensolver takes as they are (it upcasts to float64 itself).
STANDARD_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _old_style_hook(module: nn.Module, name: str):
    """The ``torch.nn.utils.spectral_norm``/``weight_norm`` pre-hook that owns ``name``, if any."""
    for hook in getattr(module, "_forward_pre_hooks", {}).values():
        if getattr(hook, "name", None) == name and hasattr(hook, "compute_weight"):
            return hook
    return None


@contextlib.contextmanager
def _eval_mode(modules):
    """Temporarily set ``training=False`` on ``modules`` (flags restored even on error)."""
    saved = [(m, m.training) for m in modules]
    try:
        for m, _ in saved:
            m.training = False
        yield
    finally:
        for m, flag in saved:
            m.training = flag


def read_weight(module: nn.Module, name: str = "weight"):
    """``module.<name>`` as the model uses it, read without side effects (see module docs).

    Returns a tensor, or None when the module has no such tensor.
    """
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, name):
        plist = cast(nn.ModuleDict, module.parametrizations)[name]  # set by parametrize
        with torch.no_grad(), _eval_mode(list(plist.modules())):
            return getattr(module, name)
    hook = _old_style_hook(module, name)
    if hook is not None:
        with torch.no_grad():
            try:
                from torch.nn.utils.spectral_norm import SpectralNorm

                if isinstance(hook, SpectralNorm):
                    return hook.compute_weight(module, do_power_iteration=False)
                return hook.compute_weight(module)
            except Exception:  # an unknown hook type: fall back to the stored attribute
                pass
    w = getattr(module, name, None)
    if callable(w) and not isinstance(w, torch.Tensor) and _is_quantized_module(module):
        try:
            w = w()
        except Exception:
            return None
        if isinstance(w, torch.Tensor) and w.is_quantized:
            w = w.dequantize()  # per-channel quantized tensors do not support the conv reshapes
    return w


def _is_quantized_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))


def alias_key(w: torch.Tensor):
    """Identity of the memory a (view of a) weight reads: equal keys mean the same matrix.

    Tied weights (GPT-2's ``wte``/``lm_head``, any Parameter shared by two modules) give the
    same key; None for tensors without addressable storage (meta, sparse, quantized).
    """
    if not isinstance(w, torch.Tensor) or w.is_meta or w.layout != torch.strided or w.is_quantized:
        return None
    try:
        return (w.device, w.dtype, w.data_ptr(), tuple(w.shape), tuple(w.stride()))
    except (RuntimeError, NotImplementedError):
        return None


AnalysableWeight = tuple | str


def analysable(w: torch.Tensor) -> AnalysableWeight:
    """``(tensor, precision_dtype)`` for the analysis, or a reason string for skipping ``w``.

    * float16/bfloat16/float32/float64: ``w`` itself (no copy).
    * float8 variants (e4m3fn, e5m2, fnuz, e8m0): upcast to float32 (every value is exact);
      ``precision_dtype`` stays the float8 type, so the rank tolerance reflects the stored
      precision.
    * quantized tensors: their dequantized float32 values.
    * sparse layouts (COO, CSR, CSC, BSR, BSC): densified (same matrix, same spectrum).
    * complex, integer and bool weights, and packed sub-byte types: skipped with the reason.
    """
    if w.is_quantized:
        try:
            return w.dequantize(), torch.float32
        except Exception as err:
            return f"quantized weight ({w.dtype}) could not be dequantized: {type(err).__name__}: {err}"
    if w.layout != torch.strided:
        try:
            w = w.to_dense()
        except Exception as err:
            return f"sparse weight ({w.layout}) could not be densified: {type(err).__name__}: {err}"
    dtype = w.dtype
    name = str(dtype).replace("torch.", "")
    if dtype in STANDARD_FLOAT_DTYPES:
        return w, dtype
    if dtype.is_complex:
        return (
            f"complex weights ({name}) are not analysed: the ESD of a complex layer (W^H W) is not "
            "comparable with the real-valued metrics"
        )
    if dtype.is_floating_point:
        try:
            return w.to(torch.float32), dtype
        except Exception:
            return f"packed {name} weights cannot be unpacked to floats here"
    return (
        f"{name} weights are not analysed: integer storage without its quantization scale has no "
        "float form (quantized modules are read through their dequantized weight)"
    )


_PARAMETRIZED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?)parametrizations\.(?P<param>[^.]+)\.original(?P<index>\d*)$")


def _spectral_normalised(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor):
    """``w / sigma`` with ``sigma = u^T W v`` from the stored power-iteration vectors (what the
    module computes in eval mode), or a reason."""
    if u.numel() == w.shape[0]:
        mat = w.reshape(w.shape[0], -1)
    elif w.ndim > 1 and u.numel() == w.shape[1]:  # transposed convolutions normalise along dim 1
        mat = w.transpose(0, 1).reshape(w.shape[1], -1)
    else:
        return f"spectral_norm vectors of shape {tuple(u.shape)} do not fit the weight {tuple(w.shape)}"
    if v.numel() != mat.shape[1]:
        return f"spectral_norm vectors of shape {tuple(v.shape)} do not fit the weight {tuple(w.shape)}"
    sigma = torch.dot(u.reshape(-1), torch.mv(mat, v.reshape(-1)))  # in the weight's dtype, as torch does
    return w / sigma


def _weight_normalised(g: torch.Tensor, v: torch.Tensor):
    """``g * v / ||v||`` (norm over every dim where ``g`` has size 1), or a reason."""
    if g.ndim != v.ndim:
        return f"weight_norm magnitude of shape {tuple(g.shape)} does not fit the direction {tuple(v.shape)}"
    dims = [d for d in range(v.ndim) if g.shape[d] == 1]
    return v * (g / v.norm(dim=dims, keepdim=True))


def effective_state_dict(state):
    """``state`` with parametrized weights rebuilt under their plain names.

    ``torch.nn.utils.parametrizations.spectral_norm``/``weight_norm`` store
    ``<m>.parametrizations.weight.original[0|1]`` (+ ``0._u``/``0._v``), the old-style hooks
    ``<m>.weight_orig``/``weight_u``/``weight_v`` or ``<m>.weight_g``/``weight_v``; each becomes
    ``<m>.weight``, the matrix the module computes with (spectral norm with its stored vectors,
    as in eval mode). Other parametrizations (e.g. ``orthogonal``) cannot be rebuilt without
    the module: their entry becomes the reason string. Other entries are unchanged.
    """
    keys = list(state)
    rebuilt: dict[str, object] = {}
    consumed: set[str] = set()
    for k in keys:
        m = _PARAMETRIZED_KEY.match(k)
        if m is None or m.group("index") not in ("", "0"):
            continue
        pre, param = m.group("prefix"), m.group("param")
        base = f"{pre}parametrizations.{param}."
        if m.group("index") == "0":  # weight_norm: original0 = magnitude g, original1 = direction v
            g, v = state.get(base + "original0"), state.get(base + "original1")
            rebuilt[k] = _weight_normalised(g, v) if isinstance(v, torch.Tensor) else "weight_norm direction missing"
            consumed.update({base + "original0", base + "original1"})
        elif isinstance(state.get(base + "0._u"), torch.Tensor) and isinstance(state.get(base + "0._v"), torch.Tensor):
            rebuilt[k] = _spectral_normalised(state[k], state[base + "0._u"], state[base + "0._v"])
            consumed.update({k, base + "0._u", base + "0._v"})
        else:
            rebuilt[k] = (
                f"parametrized {param} ({base}original): this parametrization cannot be rebuilt from a "
                "state dict; analyse the module itself"
            )
            consumed.add(k)
        rebuilt[k] = (pre + param, rebuilt[k])
    for k in keys:
        if (
            k.endswith("_orig")
            and isinstance(state.get(k[:-5] + "_u"), torch.Tensor)
            and isinstance(state.get(k[:-5] + "_v"), torch.Tensor)
        ):  # old-style spectral_norm
            p = k[:-5]
            rebuilt[k] = (p, _spectral_normalised(state[k], state[p + "_u"], state[p + "_v"]))
            consumed.update({k, p + "_u", p + "_v"})
        elif (
            k.endswith("_g") and isinstance(state.get(k[:-2] + "_v"), torch.Tensor) and k[:-2] + "_orig" not in state
        ):  # old-style weight_norm
            p = k[:-2]
            rebuilt[k] = (p, _weight_normalised(state[k], state[p + "_v"]))
            consumed.update({k, p + "_v"})
    if not rebuilt:
        return state
    out = {}
    for k in keys:
        if k in rebuilt:
            name, value = rebuilt[k]
            out[name] = value
        elif k not in consumed:
            out[k] = state[k]
    return out
