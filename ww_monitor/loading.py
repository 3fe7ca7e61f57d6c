"""Load weights from disk safely: .pt/.pth/.ckpt/.bin with ``weights_only=True``, .safetensors,
or a folder of them (sharded checkpoints are merged)."""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .errors import CheckpointError

__all__ = ["load_state_dict", "TORCH_SUFFIXES", "SAFETENSORS_SUFFIXES", "SUPPORTED_SUFFIXES"]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
SUPPORTED_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES

# Keys under which trainers nest the model's weights inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")


def load_state_dict(path: str | os.PathLike, *, weights_only: bool = True) -> dict[str, torch.Tensor]:
    """Read a checkpoint (or a folder of them) into a flat ``{name: tensor}`` dict on the CPU.

    ``weights_only=True`` (the default) uses PyTorch's restricted unpickler: a file whose pickle
    would construct arbitrary Python objects (and so could run code) is refused. Pass
    ``weights_only=False`` only for files you trust.

    Raises:
        CheckpointError: missing, unreadable, corrupt or unsupported file, unsafe pickle, or a
            file with no tensors in it.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in SUPPORTED_SUFFIXES)
        if not files:
            raise CheckpointError(f"{p}: folder holds no {'/'.join(SUPPORTED_SUFFIXES)} files")
        merged: dict[str, torch.Tensor] = {}
        for f in files:
            merged.update(_load_file(f, weights_only))
        return merged
    return _load_file(p, weights_only)


def _load_file(p: Path, weights_only: bool) -> dict[str, torch.Tensor]:
    if not os.access(p, os.R_OK):
        raise CheckpointError(f"{p}: not readable (permission denied)")
    suffix = p.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(p)
    if suffix not in TORCH_SUFFIXES:
        raise CheckpointError(
            f"{p}: unsupported file type {p.suffix or '(none)'}; expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        obj = torch.load(p, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        # The restricted unpickler names the class it refused ("Unsupported global: GLOBAL x.y");
        # anything else it chokes on is a file that is not a valid pickle at all.
        refused = [line.strip() for line in str(err).splitlines() if "global" in line.lower()]
        if weights_only and refused:
            raise CheckpointError(
                f"{p}: refused to load: the file contains Python objects that a weights-only load does "
                f"not allow (loading it could run code). If you trust this file, pass weights_only=False "
                f"(CLI: --unsafe-load). Detail: {refused[0]}"
            ) from None
        raise CheckpointError(f"{p}: corrupt, truncated or not a PyTorch checkpoint (invalid pickle data)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{p}: corrupt, truncated or not a PyTorch checkpoint ({first})") from None
    return _flatten(obj, p)


def _load_safetensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{p}: corrupt or not a safetensors file ({err})") from None


def _flatten(obj, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if isinstance(obj, Mapping):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= len(obj) / 2:
            return tensors
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, (Mapping, torch.nn.Module)):
                return _flatten(inner, p)
        if tensors:
            return tensors
    raise CheckpointError(f"{p}: holds no weight tensors (found {type(obj).__name__})")
