"""Load weights from disk safely: .pt/.pth/.ckpt/.bin with ``weights_only=True``, .safetensors,
or a folder of them (sharded checkpoints are merged).

Order of the tensors (and so of the rows of every report): a PyTorch file keeps the order it was
saved in, which is the module's own order (``state_dict()``). A safetensors file does not store
the module order (its header is sorted by name), so its tensors are put in the module order as
far as the names tell it (:mod:`.model_order`): numeric parts compared as numbers (``layers.2``
before ``layers.10``), embeddings first, attention before the MLP and query, key, value, output
within attention, heads (``lm_head``, ``classifier``) last; other siblings in natural order. The
files of a folder are read in natural order.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from .model_order import model_order_key, natural_key

__all__ = [
    "load_state_dict",
    "checkpoint_files",
    "natural_key",
    "TORCH_SUFFIXES",
    "SAFETENSORS_SUFFIXES",
    "SUPPORTED_SUFFIXES",
]

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
SAFETENSORS_SUFFIXES = (".safetensors",)
SUPPORTED_SUFFIXES = TORCH_SUFFIXES + SAFETENSORS_SUFFIXES

# Keys under which trainers nest the model's weights inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module")

#: Files a training framework writes beside the model that hold no model weights (Hugging Face
#: Trainer's ``checkpoint-N/`` folders, accelerate, DeepSpeed): never read as the model.
_NOT_MODEL = re.compile(
    r"^(optimizer|scheduler|scaler|rng_state|training_args|trainer_state|lr_scheduler|random_states)"
    r"([_.\-].*)?$"
)
#: Index files of sharded checkpoints: ``{"weight_map": {tensor name: shard file}}``.
_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


#: What ``analyze``/``distances`` read: a model, a state dict, or a checkpoint file or folder.
ModelSource = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


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
        files, notes = checkpoint_files(p)
        for note in notes:
            log.info("ww_monitor: %s", note)
        merged: dict[str, torch.Tensor] = {}
        for f in files:
            merged.update(_load_file(f, weights_only))
        if all(f.suffix in SAFETENSORS_SUFFIXES for f in files):  # shards split blocks: order the whole
            merged = {k: merged[k] for k in sorted(merged, key=model_order_key)}
        return merged
    return _load_file(p, weights_only)


def checkpoint_files(folder: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """The files of ``folder`` that hold the model, and a note for each file left out.

    One group of files is read, the first that exists of: the shards named by a
    ``*.safetensors.index.json``; ``model*.safetensors``; any other ``*.safetensors``; the
    shards of a ``pytorch_model.bin.index.json``; ``pytorch_model*.bin``; the remaining
    .pt/.pth/.ckpt/.bin files (merged). Optimizer, scheduler, scaler, RNG-state, trainer-state
    and training-arguments files are never read as the model. So a Hugging Face
    ``checkpoint-N/`` folder is read as its ``model.safetensors``, without loading (or asking
    to unsafely load) ``training_args.bin``.

    Raises:
        CheckpointError: the folder holds no model weight file.
    """
    p = Path(folder)
    entries = sorted((f for f in p.iterdir() if f.is_file()), key=lambda f: natural_key(f.name))
    notes = [
        f"{f.name}: not model weights (optimizer/scheduler/RNG/trainer state); not read"
        for f in entries
        if _NOT_MODEL.match(f.name) and (f.suffix in SUPPORTED_SUFFIXES or f.suffix == ".json")
    ]
    weights = [f for f in entries if f.suffix in SUPPORTED_SUFFIXES and not _NOT_MODEL.match(f.name)]
    safetensors = [f for f in weights if f.suffix in SAFETENSORS_SUFFIXES]
    torch_files = [f for f in weights if f.suffix in TORCH_SUFFIXES]
    groups = [
        _indexed_shards(p, entries, ".safetensors.index.json"),
        [f for f in safetensors if f.name.startswith("model")],
        safetensors,
        _indexed_shards(p, entries, ".bin.index.json"),
        [f for f in torch_files if f.name.startswith("pytorch_model")],
        torch_files,
    ]
    chosen = next((g for g in groups if g), [])
    if not chosen:
        raise CheckpointError(
            f"{p}: folder holds no {'/'.join(SUPPORTED_SUFFIXES)} model weight files"
            + (f" ({len(notes)} file(s) of optimizer/trainer state only)" if notes else "")
        )
    notes += [
        f"{f.name}: not read (the model is read from {', '.join(c.name for c in chosen[:3])}"
        f"{' ...' if len(chosen) > 3 else ''})"
        for f in weights
        if f not in chosen
    ]
    return chosen, notes


def _indexed_shards(folder: Path, entries: list[Path], suffix: str) -> list[Path]:
    """Shard files named by the first ``*<suffix>`` index in ``folder`` (empty when none)."""
    for index in (f for f in entries if f.name.endswith(suffix)):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted({str(v) for v in weight_map.values()}, key=natural_key)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(
                f"{index}: not a valid sharded-checkpoint index ({type(err).__name__}: {err})"
            ) from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    return []


def _load_file(p: Path, weights_only: bool, map_location: str = "cpu", mmap: bool = False) -> dict[str, torch.Tensor]:
    """One file's tensors; PyTorch files onto ``map_location`` (``"meta"``: shapes only, no data read),
    memory-mapped with ``mmap`` (zip-format files: their storages are not read until used)."""
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
        obj = torch.load(p, map_location=map_location, weights_only=weights_only, mmap=mmap)
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
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{p}: corrupt or not a safetensors file ({err})") from None
    return {k: tensors[k] for k in sorted(tensors, key=model_order_key)}


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
