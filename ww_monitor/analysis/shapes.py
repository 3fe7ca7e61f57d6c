"""A model's weights as shapes only, for a cost plan: nothing is downloaded, no weight is read.

* A Hugging Face ``transformers`` config (a ``config.json`` file, or a folder holding one): the
  model is built on the meta device (``AutoModelForCausalLM.from_config`` under
  ``torch.device("meta")``, else the class its ``architectures`` names, else ``AutoModel``), so a
  7B model costs a few seconds and no memory. It has the module types and tied weights that the
  monitor sees in training. Needs ``transformers`` (``pip install "ww-monitor[huggingface]"``).
* A checkpoint (``.safetensors``: the header's names, shapes and dtypes; ``.pt``/``.pth``/``.ckpt``/
  ``.bin``: ``torch.load(weights_only=True)`` memory-mapped, which reads the pickle but not the
  tensor data; or a folder of them): a state dict of meta tensors (one per stored tensor, so a
  tied weight saved under two names stays one), selected as :func:`~ww_monitor.analysis.analyze`
  selects from a state dict.

``dtype`` casts every floating weight, e.g. to plan a bfloat16 run from a float32 checkpoint.
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, WWMonitorError
from .loading import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, _load_file, checkpoint_files
from .model_order import model_order_key

__all__ = ["load_shapes", "meta_model_from_config", "meta_state_dict", "CONFIG_NAME"]

CONFIG_NAME = "config.json"
#: safetensors header dtype names -> torch dtypes (the names the format specifies).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_MISSING_TRANSFORMERS = (
    "building a model from a transformers config needs the `transformers` package: "
    'pip install "ww-monitor[huggingface]" (or pass a .safetensors/.pt checkpoint instead)'
)


def load_shapes(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, weights_only: bool = True
) -> tuple[nn.Module | dict, str]:
    """A meta-device model (config) or meta state dict (checkpoint) for ``path``, and what it is
    (``"LlamaForCausalLM from config.json"``). Raises :class:`~ww_monitor.errors.WWMonitorError`."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.suffix.lower() == ".json" or (p.is_dir() and (p / CONFIG_NAME).is_file()):
        model = meta_model_from_config(p, dtype=dtype)
        return model, f"{type(model).__name__} from {p.name if p.is_file() else p.name + '/' + CONFIG_NAME}"
    state = meta_state_dict(p, weights_only=weights_only)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state, f"{len(state)} tensors from {p.name}"


def _config_dict(p: Path) -> dict:
    file = p / CONFIG_NAME if p.is_dir() else p
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not a readable JSON config ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointError(f'{file}: not a transformers config (no "model_type")')
    return data


def meta_model_from_config(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> nn.Module:
    """The model a transformers ``config.json`` describes, on the meta device (no weights).

    Its dtype is ``dtype``, else the config's ``dtype``/``torch_dtype``, else float32.
    """
    data = _config_dict(Path(path))
    try:
        import transformers
    except ImportError:
        raise WWMonitorError(_MISSING_TRANSFORMERS) from None
    data = dict(data)
    model_type = data.pop("model_type")
    if "torch_dtype" in data:  # the older name of `dtype` (transformers warns about it)
        data.setdefault("dtype", data.pop("torch_dtype"))
    stored = data.get("dtype")
    try:
        config = transformers.AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError, TypeError) as err:
        raise WWMonitorError(
            f"{path}: transformers cannot build a config for model_type={model_type!r}: {err}"
        ) from None
    model = _build(transformers, config)
    target = dtype if dtype is not None else _torch_dtype(stored)
    return model.to(target) if target is not None else model


def _build(transformers, config) -> nn.Module:
    """Causal-LM head first (what is fine-tuned), then the class ``architectures`` names, then the bare model."""
    errors = []
    builders: list[Callable[[], nn.Module]] = [lambda: transformers.AutoModelForCausalLM.from_config(config)]
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            builders.append(functools.partial(cls, config))
    builders.append(lambda: transformers.AutoModel.from_config(config))
    for build in builders:
        try:
            with torch.device("meta"):
                return build()
        except (ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as err:
            errors.append(f"{type(err).__name__}: {err}")
    raise WWMonitorError(f"transformers could not build a model from this config ({errors[-1]})")


def _torch_dtype(name) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    return value if isinstance(value, torch.dtype) else None


def meta_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """``{name: meta tensor}`` with the stored shapes and dtypes of a checkpoint file or folder."""
    p = Path(path)
    files = checkpoint_files(p)[0] if p.is_dir() else [p]
    merged: dict[str, torch.Tensor] = {}
    for f in files:
        suffix = f.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            merged.update(_safetensors_shapes(f))
        elif suffix in TORCH_SUFFIXES:
            merged.update(_torch_shapes(f, weights_only))
        else:
            raise CheckpointError(
                f"{f}: unsupported file type {f.suffix or '(none)'}; expected a config.json, "
                f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)} or a folder"
            )
    return merged


def _safetensors_shapes(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    out = {}
    try:
        with safe_open(str(p), framework="pt") as f:
            for key in sorted(f.keys(), key=model_order_key):  # the order the analysis lists them in
                part = f.get_slice(key)
                name = part.get_dtype()
                dtype = _SAFETENSORS_DTYPES.get(name)
                if dtype is None:
                    raise CheckpointError(f"{p}: tensor {key!r} has dtype {name}, which ww_monitor does not know")
                out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{p}: corrupt or not a safetensors file ({err})") from None
    return out


def _torch_shapes(p: Path, weights_only: bool) -> dict[str, torch.Tensor]:
    """A PyTorch file's tensors as meta tensors. Zip-format files (``torch.save``'s default) are
    memory-mapped, so no tensor data is read, and tensors saved once under two names (tied
    weights) become one meta tensor; older files are loaded onto the meta device directly."""
    if not zipfile.is_zipfile(p):
        return _load_file(p, weights_only, map_location="meta")
    state = _load_file(p, weights_only, mmap=True)
    metas: dict = {}
    out = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if ptr else name
        out[name] = metas.setdefault(key, torch.empty(t.shape, dtype=t.dtype, device="meta"))
    return out
