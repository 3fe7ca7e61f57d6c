"""Layer names as people read them: the wrapper prefix (``model.model.``, ``module.``, ...) left out.

A LightningModule that holds a Hugging Face LLaMA as ``self.model`` names its layers
``model.model.layers.3.mlp.up_proj`` and ``model.lm_head``; DDP adds ``module.``,
``torch.compile`` ``_orig_mod.``, peft ``base_model.model.``. Those words say how the model was
wrapped, not which layer it is, and take ~40% of a label. **The rule** (one for every figure,
table, report and alert message):

1. From each name, drop the leading dotted parts that are wrapper attributes
   (:data:`WRAPPER_SEGMENTS`), keeping at least the last part:
   ``model.model.layers.3.mlp.up_proj`` -> ``layers.3.mlp.up_proj``,
   ``model.lm_head`` -> ``lm_head``, ``module._orig_mod.fc1`` -> ``fc1``.
   Names that do not start with a wrapper attribute are shown unchanged
   (``transformer.h.0.attn.c_attn``, ``bert.encoder.layer.0.attention.self.query``, ``0``).
2. If that makes two different layers look alike (``model.fc`` and ``fc`` in one model), only
   the wrapper prefix that *every* name shares is dropped (removing a common prefix never merges
   two names); when there is none, the names are shown in full.

TensorBoard tags, history columns, ``Report`` rows and :class:`~ww_monitor.monitoring.alerts.Alert`
objects keep the full names, so code that looks a layer up by name is unaffected; only what is
displayed is shortened. :func:`display_names` gives the displayed names of a set of layers (the
set matters: step 2 looks at all of them), :func:`display_name_map` the same as a dict.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["WRAPPER_SEGMENTS", "strip_wrappers", "display_names", "display_name_map"]

#: Attribute names that wrap a model rather than name a layer of it: ``model`` (a
#: LightningModule's or a Hugging Face ``*For*`` head's base model), ``module`` (DataParallel /
#: DistributedDataParallel), ``_orig_mod`` (``torch.compile``), ``base_model`` (peft),
#: ``_fsdp_wrapped_module`` / ``_checkpoint_wrapped_module`` (FSDP, activation checkpointing),
#: ``_forward_module`` (Lightning Fabric).
WRAPPER_SEGMENTS = frozenset(
    {
        "model",
        "module",
        "_orig_mod",
        "base_model",
        "_fsdp_wrapped_module",
        "_checkpoint_wrapped_module",
        "_forward_module",
    }
)


def _wrapper_depth(parts: list[str]) -> int:
    """How many leading parts are wrapper attributes (never all of them)."""
    k = 0
    while k < len(parts) - 1 and parts[k] in WRAPPER_SEGMENTS:
        k += 1
    return k


def strip_wrappers(name: str) -> str:
    """Step 1 of the rule for one name (no collision check): ``model.model.layers.0.x`` -> ``layers.0.x``."""
    parts = name.split(".")
    return ".".join(parts[_wrapper_depth(parts) :])


def display_names(names: Iterable[str]) -> list[str]:
    """The displayed name of each of ``names`` (same order; see the module docstring for the rule)."""
    names = list(names)
    short = [strip_wrappers(n) for n in names]
    if len(set(short)) == len(set(names)):
        return short
    # Some names collide: drop only the wrapper prefix all names share.
    split = [n.split(".") for n in names]
    common = min((_wrapper_depth(p) for p in split), default=0)
    while common and len({tuple(p[:common]) for p in split}) > 1:
        common -= 1
    return [".".join(p[common:]) for p in split]


def display_name_map(names: Iterable[str]) -> dict[str, str]:
    """``{full name: displayed name}`` for a set of layers."""
    names = list(dict.fromkeys(names))
    return dict(zip(names, display_names(names)))
