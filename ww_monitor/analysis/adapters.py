"""LoRA / PEFT adapters: what is analysed for a model whose layers carry low-rank adapters.

A LoRA layer (``peft``'s ``lora.Linear`` and anything shaped like it: a ``base_layer`` plus
``lora_A`` / ``lora_B`` dicts of factors and a ``scaling`` dict) adds
``delta_W = scaling * B @ A`` (B: out x r, A: r x in) to its base weight. weightwatcher 0.7.7's
``peft`` option names the choices; here:

* ``peft=False`` (default): the base weights, reported under the layer's own name (without
  ``.base_layer``); the factors A and B are not layers and are not analysed one by one (a
  freshly initialised B is all zeros and would look like rank collapse).
* ``peft=True`` / ``"peft_only"``: only the adapter updates, as ``<layer>.lora_BA.<adapter>``
  (kind ``"lora"``); every other layer is left out (weightwatcher's behaviour).
* ``"with_base"``: everything: the other layers, the updates, and each merged weight
  ``W + delta_W`` as ``<layer>.lora_W_plus_AB.<adapter>``.
* ``"auto"`` (the default of the training-time monitors): the base weights as with ``False``
  plus the adapter updates as with ``True`` (no merged weights); without LoRA layers the same as
  ``False``. Under LoRA the base weights do not require grad, so the monitor analyses them once
  (:mod:`.frozen`) and the updates at every snapshot.

An update has rank <= r, so its ESD is its r largest eigenvalues (weightwatcher truncates the
SVD to the LoRA rank likewise). They are computed from an r x r *core* with the same singular
values: with ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR), ``delta_W = Q_B (s R_B R_A^T) Q_A^T``,
so the core ``s R_B R_A^T`` costs O((out + in) r^2) and r^2 numbers of memory, instead of an
out x in product. An update that is exactly zero (``lora_B`` is zero-initialised, so every
adapter starts that way) is reported in ``skipped`` with :data:`ZERO_UPDATE_REASON`, never as a
rank collapse. The update includes ``scaling`` (what training actually adds to W);
weightwatcher multiplies B and A without it, which changes norms but not alpha.

State dicts (e.g. ``adapter_model.safetensors``) hold no ``scaling``: there it is taken as 1.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..errors import WWMonitorError
from .frozen import parameters_read
from .layers import FoundLayer, LayerMatrix, clean_name

__all__ = [
    "PEFT_MODES",
    "ZERO_UPDATE_REASON",
    "check_peft",
    "lora_layers",
    "update_core",
    "with_adapters",
    "adapters_from_state_dict",
]

PEFT_MODES = (False, True, "peft_only", "with_base", "auto")
#: Reason given for an adapter whose update is exactly zero (the state right after initialisation).
ZERO_UPDATE_REASON = "adapter update is exactly zero (LoRA B starts at zero; nothing learned yet)"
_ONLY_ADAPTERS = (True, "peft_only")


def check_peft(value) -> object:
    if not any(value is m or (isinstance(m, str) and value == m) for m in PEFT_MODES):
        raise WWMonitorError(f"`peft` must be one of {PEFT_MODES}, got {value!r}")
    return value


def lora_layers(model: nn.Module) -> dict[str, Any]:
    """LoRA-wrapped layers of ``model`` by (cleaned) module name (peft's ``LoraLayer``: its
    ``lora_A``/``lora_B``/``base_layer``/``scaling`` are set at run time, hence ``Any``)."""
    out = {}
    for raw, mod in model.named_modules():
        a, b = getattr(mod, "lora_A", None), getattr(mod, "lora_B", None)
        if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict) and len(a) and hasattr(mod, "base_layer"):
            out[clean_name(raw)] = mod
    return out


@torch.no_grad()
def update_core(a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """r x r matrix whose singular values are those of ``scaling * b @ a`` (b: out x r, a: r x in)."""
    dtype = a.dtype if a.is_floating_point() else torch.float32
    _, rb = torch.linalg.qr(b.detach().to(torch.float64))
    _, ra = torch.linalg.qr(a.detach().to(torch.float64).T)
    return (float(scaling) * rb @ ra.T).to(dtype)


def _factor(layer: Any, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.lora_A[adapter].weight, layer.lora_B[adapter].weight


def _owner(name: str, owners: Iterable[str]) -> str | None:
    for o in owners:
        if name == o or name.startswith(o + "."):
            return o
    return None


def with_adapters(found: Iterable[FoundLayer], model: nn.Module, mode) -> Iterator[FoundLayer]:
    """Filter/extend ``layers.matrices_from_module`` output for the ``peft`` ``mode``."""
    loras = lora_layers(model)
    if not loras:
        if mode not in _ONLY_ADAPTERS:
            yield from found
        return
    base_kinds: dict[str, str] = {}
    for name, kind, item in found:
        owner = _owner(name, loras)
        if owner is None:
            if mode not in _ONLY_ADAPTERS:
                yield name, kind, item
            continue
        if name == owner + ".base_layer":
            base_kinds[owner] = kind
            if mode not in _ONLY_ADAPTERS and not isinstance(item, str):
                for m in item:
                    m.name = owner + m.name[len(name) :]
                yield owner, kind, item
        # the wrapper itself, the A/B factors and dropout are not layers of their own
    if mode is False:
        return
    for owner, layer in loras.items():
        for adapter in layer.lora_A:
            if adapter not in layer.lora_B:
                continue
            a, b = _factor(layer, adapter)
            if a.ndim < 2 or b.ndim < 2:  # an FSDP1 shard, outside the group that gathers this layer
                continue
            scaling = float(getattr(layer, "scaling", {}).get(adapter, 1.0))
            name = f"{owner}.lora_BA.{adapter}"
            yield name, "lora", [LayerMatrix(name, "lora", update_core(a, b, scaling), reads=(a, b))]
            if mode != "with_base":
                continue
            # Each layer reads the weights it uses, after the previous one (sharded models are gathered per layer).
            base = getattr(layer.base_layer, "weight", None)
            if isinstance(base, torch.Tensor) and base.ndim == 2:
                a, b = _factor(layer, adapter)
                merged = base.detach() + (scaling * (b.detach().to(base.dtype) @ a.detach().to(base.dtype)))
                mname = f"{owner}.lora_W_plus_AB.{adapter}"
                kind = base_kinds.get(owner, "linear")
                yield mname, kind, [LayerMatrix(mname, kind, merged, reads=(*parameters_read(layer.base_layer), a, b))]


_LORA_KEY = re.compile(r"^(?P<owner>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def adapters_from_state_dict(state: Mapping[str, torch.Tensor], mode) -> tuple[dict, list[FoundLayer]]:
    """Split a state dict into (non-LoRA entries, adapter layers) for the ``peft`` ``mode``.

    Keys ``<owner>.lora_A[.<adapter>].weight`` / ``...lora_B...`` pair into updates (scaling 1);
    ``<owner>.base_layer.weight`` becomes ``<owner>.weight``.
    """
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _LORA_KEY.match(clean_name(key))
        if m and isinstance(t, torch.Tensor) and t.ndim == 2:
            pairs.setdefault((m["owner"], m["adapter"] or "default"), {})[m["ab"]] = t
        else:
            rest[key.replace(".base_layer.", ".")] = t
    if not pairs:
        return (rest if mode not in _ONLY_ADAPTERS else {}), []
    extra: list[FoundLayer] = []
    if mode is not False:
        for (owner, adapter), ab in pairs.items():
            if "A" not in ab or "B" not in ab:
                continue
            name = f"{owner}.lora_BA.{adapter}"
            extra.append((name, "lora", [LayerMatrix(name, "lora", update_core(ab["A"], ab["B"]))]))
            base = rest.get(owner + ".weight")
            if mode == "with_base" and isinstance(base, torch.Tensor) and base.ndim == 2:
                mname = f"{owner}.lora_W_plus_AB.{adapter}"
                merged = base + ab["B"].to(base.dtype) @ ab["A"].to(base.dtype)
                extra.append((mname, "linear", [LayerMatrix(mname, "linear", merged)]))
    return (rest if mode not in _ONLY_ADAPTERS else {}), extra
