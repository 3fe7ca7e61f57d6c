"""Which weight matrices are analysed, and how each layer type becomes one or more ESDs.

A :class:`LayerMatrix` is one ESD: a 2-D matrix, or a stack of k slices whose
eigenvalues are pooled (convolutions: one slice per kernel position, each out x in).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import WWMonitorError
from .frozen import parameters_read
from .weight_access import read_weight

__all__ = [
    "LayerMatrix",
    "LayerSelection",
    "KINDS",
    "CONV_MODES",
    "CONV_SLICE_SCALE",
    "clean_name",
    "matrices_from_module",
    "matrices_from_state_dict",
]

#: Layer kinds users can select with ``kinds=``.
KINDS = (
    "linear",
    "conv1d_hf",
    "embedding",
    "conv1d",
    "conv2d",
    "conv3d",
    "attention",
    "rnn",
    "other",
    "lora",
)  # lora: adapter updates, see ww_monitor.analysis.adapters
CONV_MODES = ("pooled", "slices")

#: weightwatcher's default ``conv2d_norm``: each kernel slice is scaled by sqrt(1/2), which halves
#: its eigenvalues, so pooled conv ESDs sit on the same scale as published numbers.
CONV_SLICE_SCALE = 0.5

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
_GATES = {1: ("",), 3: ("r", "z", "n"), 4: ("i", "f", "g", "o")}  # RNN, GRU, LSTM row blocks
_RNN_WEIGHT = re.compile(r"^weight_(ih|hh)_l\d+(_reverse)?$")


def clean_name(name: str) -> str:
    """Module path with ``torch.compile`` (``_orig_mod.``) and DDP/DP (``module.``) wrappers removed."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        for infix in _WRAPPER_PREFIXES:
            token = "." + infix
            if token in name:
                name, changed = name.replace(token, "."), True
    return name


@dataclass
class LayerMatrix:
    """One ESD to compute: ``weight`` is rows x cols, or k x rows x cols pooled slices."""

    name: str
    kind: str
    weight: torch.Tensor
    eig_scale: float = 1.0  # eigenvalues are multiplied by this (conv slice scaling)
    #: Other names of the same tensor (tied/shared weights): analysed once, under ``name``.
    aliases: tuple[str, ...] = ()
    #: Dtype the weight is stored in when ``weight`` is a float copy of it (float8, quantized);
    #: sets the rank tolerance and the reported ``dtype``. None: ``weight.dtype``.
    stored_dtype: torch.dtype | None = None
    #: The registered parameters this matrix is computed from (:mod:`.frozen`); empty when unknown.
    reads: tuple = field(default=(), repr=False, compare=False)
    #: No parameter it reads requires grad (:func:`.frozen.is_frozen`, decided by the selection).
    frozen: bool = False

    @property
    def precision(self) -> torch.dtype:
        return self.stored_dtype if self.stored_dtype is not None else self.weight.dtype

    @property
    def num_slices(self) -> int:
        return self.weight.shape[0] if self.weight.ndim == 3 else 1

    @property
    def N(self) -> int:
        return max(self.weight.shape[-2:])

    @property
    def M(self) -> int:
        return min(self.weight.shape[-2:])

    @property
    def num_evals(self) -> int:
        return self.M * self.num_slices


#: What the layer finders yield: (layer name, kind, its matrices or the reason it is not analysed).
FoundLayer = tuple[str, str, list[LayerMatrix] | str]


@dataclass(frozen=True)
class LayerSelection:
    """Which layers to analyse: name regexes (``re.search``) and kinds."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    kinds: tuple[str, ...] | None = None

    @staticmethod
    def build(include=None, exclude=None, kinds=None) -> LayerSelection:
        inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
        if kinds is not None:
            kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
            bad = [k for k in kinds if k not in KINDS]
            if bad:
                raise WWMonitorError(f"unknown layer kind(s) {bad}; choose from {list(KINDS)}")
        return LayerSelection(inc, exc, kinds)

    def explicitly_included(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.include)

    def why_not(self, name: str, kind: str) -> str | None:
        """None when the layer is selected, else the reason it is not."""
        if self.include and not self.explicitly_included(name):
            return "not matched by include"
        if any(re.search(p, name) for p in self.exclude):
            return "matched by exclude"
        if self.kinds is not None and kind not in self.kinds:
            return f"kind {kind!r} not in kinds"
        return None


def _patterns(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    pats = (value,) if isinstance(value, str) else tuple(value)
    for p in pats:
        try:
            re.compile(p)
        except (re.error, TypeError) as err:
            raise WWMonitorError(f"{what} pattern {p!r} is not a valid regular expression: {err}") from None
    return pats


def _reading(matrices: list[LayerMatrix], params: tuple) -> list[LayerMatrix]:
    """``matrices`` with the parameters they are computed from (:mod:`.frozen`)."""
    for m in matrices:
        m.reads = params
    return matrices


def _conv_matrices(name: str, kind: str, w: torch.Tensor, conv_mode: str) -> list[LayerMatrix]:
    # (out, in, *kernel) -> (prod(kernel), out, in): one out x in slice per kernel position.
    out_c, in_c = w.shape[:2]
    slices = w.reshape(out_c, in_c, -1).permute(2, 0, 1)
    if conv_mode == "pooled" or slices.shape[0] == 1:
        return [LayerMatrix(name, kind, slices, CONV_SLICE_SCALE)]
    return [LayerMatrix(f"{name}.slice{i}", kind, slices[i], CONV_SLICE_SCALE) for i in range(slices.shape[0])]


def _split_rows(name: str, kind: str, w: torch.Tensor, labels: Sequence[str]) -> list[LayerMatrix]:
    if len(labels) == 1:
        return [LayerMatrix(name, kind, w)]
    chunks = w.chunk(len(labels), dim=0)
    return [LayerMatrix(f"{name}.{lab}", kind, c) for lab, c in zip(labels, chunks)]


def _rnn_matrices(prefix: str, pname: str, w: torch.Tensor, gates: int) -> list[LayerMatrix]:
    return _split_rows(f"{prefix}.{pname}" if prefix else pname, "rnn", w, _GATES[gates])


def _module_matrices(name: str, module: nn.Module, conv_mode: str) -> Iterator[FoundLayer]:
    """Yield (name, kind, LayerMatrix list or unsupported-reason) for one module's own weights."""
    if isinstance(module, nn.MultiheadAttention):
        in_proj = read_weight(module, "in_proj_weight")
        if in_proj is not None:
            yield (
                name,
                "attention",
                _reading(
                    _split_rows(f"{name}", "attention", in_proj, ("q", "k", "v")),
                    parameters_read(module, "in_proj_weight"),
                ),
            )
        else:
            for tag in ("q", "k", "v"):
                p = read_weight(module, f"{tag}_proj_weight")
                yield (
                    name,
                    "attention",
                    _reading(
                        [LayerMatrix(f"{name}.{tag}", "attention", p)], parameters_read(module, f"{tag}_proj_weight")
                    ),
                )
        # out_proj is an nn.Linear child; named_modules() visits it as "<name>.out_proj".
        return
    if isinstance(module, nn.RNNBase):
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        for pname, p in module.named_parameters(recurse=False):
            if _RNN_WEIGHT.match(pname):
                yield name, "rnn", _reading(_rnn_matrices(name, pname, p, gates), (p,))
        return
    w = read_weight(module)  # parametrizations and quantized modules without side effects
    if isinstance(w, nn.parameter.UninitializedParameter):
        yield (
            name,
            "other",
            f"{type(module).__name__} weight not materialised yet (lazy module before its first forward)",
        )
        return
    if not isinstance(w, torch.Tensor) or w.ndim < 2:
        return
    quantized = _quantized_kind(module, w)
    if isinstance(module, nn.Linear) or quantized == "linear":
        yield name, "linear", [LayerMatrix(name, "linear", w)]
    elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or quantized == "embedding":
        yield name, "embedding", [LayerMatrix(name, "embedding", w)]
    elif isinstance(module, nn.modules.conv._ConvNd) or quantized == "conv":
        kind = {3: "conv1d", 4: "conv2d", 5: "conv3d"}.get(w.ndim)
        if kind is None:
            yield name, "other", f"convolution weight of shape {tuple(w.shape)} is not supported"
        else:
            # Transposed convs store (in, out, *k); the ESD is the same up to transposition.
            yield name, kind, _conv_matrices(name, kind, w, conv_mode)
    elif type(module).__name__ == "Conv1D" and w.ndim == 2:
        # Hugging Face GPT-2 style Conv1D: a Linear whose weight is stored (in, out).
        yield name, "conv1d_hf", [LayerMatrix(name, "conv1d_hf", w)]
    elif w.ndim == 2:
        yield name, "other", [LayerMatrix(name, "other", w)]
    else:
        yield name, "other", f"{type(module).__name__} weight of shape {tuple(w.shape)} is not supported"


def _quantized_kind(module: nn.Module, w) -> str | None:
    """Kind of a ``torch.ao`` quantized module (they do not subclass ``nn.Linear`` etc.)."""
    if not type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
        return None
    cls = type(module).__name__
    if cls.startswith("Linear"):
        return "linear"
    if cls.startswith("Embedding"):
        return "embedding"
    if cls.startswith("Conv") and isinstance(w, torch.Tensor) and w.ndim in (3, 4, 5):
        return "conv"
    return None


def matrices_from_module(model: nn.Module, conv_mode: str = "pooled") -> Iterator[FoundLayer]:
    """Walk ``model.named_modules()``; yields (layer name, kind, [LayerMatrix] or reason str)."""
    attention_blocks = set()
    # Modules registered under several names are visited under each (their weights become aliases).
    for raw, module in model.named_modules(remove_duplicate=False):
        name = clean_name(raw)
        if isinstance(module, nn.MultiheadAttention):
            attention_blocks.add(name)
        parent, _, leaf = name.rpartition(".")
        if leaf == "out_proj" and parent in attention_blocks and isinstance(module, nn.Linear):
            yield (
                name,
                "attention",
                [LayerMatrix(name, "attention", read_weight(module), reads=parameters_read(module))],
            )
            continue
        for found in _module_matrices(name, module, conv_mode):
            yield _weight_reads(found, module)


def _weight_reads(found: FoundLayer, module: nn.Module) -> FoundLayer:
    """Matrices without their parameters yet read ``module.weight`` (attention and RNN set theirs)."""
    item = found[2]
    if not isinstance(item, str) and any(not m.reads for m in item):
        reads = parameters_read(module)
        for m in item:
            m.reads = m.reads or reads
    return found


#: Leaf names of embeddings whose names do not say "emb" (GPT-2's token and position tables).
_EMBEDDING_LEAVES = ("wte", "wpe")
#: Leaf names of Hugging Face ``Conv1D`` layers in GPT-2-style models; used for square weights,
#: whose orientation the bias cannot tell, once another layer of the state dict is a proven Conv1D.
_HF_CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")


def _transposed_by_bias(state: Mapping[str, torch.Tensor], raw: str, w: torch.Tensor) -> bool:
    """A 2-D ``weight`` stored (in, out), as HF ``Conv1D`` stores it: its bias matches the columns."""
    bias = state.get(raw[: -len("weight")] + "bias")
    return (
        isinstance(bias, torch.Tensor) and bias.ndim == 1 and w.shape[0] != w.shape[1] and bias.shape[0] == w.shape[1]
    )


def _state_dict_kind(state, raw: str, name: str, w: torch.Tensor, has_conv1d_hf: bool) -> str:
    leaf = name.rpartition(".")[2]
    if re.search(r"emb", name, re.IGNORECASE) or leaf in _EMBEDDING_LEAVES:
        return "embedding"
    if _transposed_by_bias(state, raw, w) or (has_conv1d_hf and leaf in _HF_CONV1D_LEAVES):
        return "conv1d_hf"
    return "linear"


def matrices_from_state_dict(state: Mapping[str, torch.Tensor], conv_mode: str = "pooled") -> Iterator[FoundLayer]:
    """Infer layers from parameter names and shapes when no module is available.

    ``*.weight`` 2-D -> linear (embedding when the name says so or is GPT-2's ``wte``/``wpe``;
    ``conv1d_hf`` when the bias matches the columns, i.e. the weight is stored (in, out) like
    Hugging Face's ``Conv1D``), 3/4/5-D -> conv; ``*.in_proj_weight`` -> attention q/k/v;
    ``*.weight_ih_l*``/``weight_hh_l*`` -> rnn gates. Parametrized (``spectral_norm``,
    ``weight_norm``) entries are rebuilt into the weight the module would use.
    """
    from .weight_access import effective_state_dict

    state = effective_state_dict(state)
    has_conv1d_hf = any(
        isinstance(w, torch.Tensor)
        and w.ndim == 2
        and k.endswith("weight")
        and _transposed_by_bias(state, k, w)
        and k.rpartition(".")[0].rpartition(".")[2] in _HF_CONV1D_LEAVES
        for k, w in state.items()
    )
    for raw, w in state.items():
        if isinstance(w, str):  # a weight the pre-pass could not rebuild: its reason
            yield clean_name(raw).rpartition(".")[0], "other", w
            continue
        if not isinstance(w, torch.Tensor) or w.ndim < 2:
            continue
        key = clean_name(raw)
        prefix, _, pname = key.rpartition(".")
        if pname == "in_proj_weight":
            yield prefix, "attention", _split_rows(prefix, "attention", w, ("q", "k", "v"))
        elif pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            yield prefix, "attention", [LayerMatrix(f"{prefix}.{pname[0]}", "attention", w)]
        elif _RNN_WEIGHT.match(pname):
            hidden = w.shape[1] if pname.startswith("weight_hh") else None
            hh = state.get(raw.replace("weight_ih", "weight_hh"))
            if hidden is None and isinstance(hh, torch.Tensor):
                hidden = hh.shape[1]
            gates = w.shape[0] // hidden if hidden else 1
            yield prefix, "rnn", _rnn_matrices(prefix, pname, w, gates if gates in _GATES else 1)
        elif pname == "weight":
            name = prefix
            if w.ndim == 2:
                kind = _state_dict_kind(state, raw, name, w, has_conv1d_hf)
                yield name, kind, [LayerMatrix(name, kind, w)]
            elif w.ndim in (3, 4, 5):
                kind = {3: "conv1d", 4: "conv2d", 5: "conv3d"}[w.ndim]
                yield name, kind, _conv_matrices(name, kind, w, conv_mode)
            else:
                yield name, "other", f"weight of shape {tuple(w.shape)} is not supported"


def available_layer_names(model: nn.Module, conv_mode: str = "pooled") -> list[str]:
    """Names of every weight matrix the layer finder sees in ``model`` (for error messages)."""
    names = []
    for name, _, item in matrices_from_module(model, conv_mode):
        names.extend([m.name for m in item] if not isinstance(item, str) else [name])
    return list(dict.fromkeys(names))


#: Start of every reason :func:`size_problem` gives (limits the user configures).
_SIZE_REASON = re.compile(r"^(empty weight|\d+ eigenvalues [<>]|N=\d+ > max_n|float64 copy needs)")


def is_size_limit(reason: str) -> bool:
    """Whether a skip reason comes from the size limits (configuration, not a problem)."""
    return bool(_SIZE_REASON.match(reason))


def size_problem(m: LayerMatrix, min_evals: int, max_evals: int | None, max_n: int | None) -> str | None:
    """Why a matrix is outside the size limits (weightwatcher defaults: min 8 eigenvalues)."""
    if m.weight.numel() == 0:
        return "empty weight"
    if m.num_evals < min_evals:
        return f"{m.num_evals} eigenvalues < min_evals={min_evals}"
    if max_evals is not None and m.num_evals > max_evals:
        return f"{m.num_evals} eigenvalues > max_evals={max_evals}"
    if max_n is not None and m.N > max_n:
        return f"N={m.N} > max_n={max_n}"
    return None


def nbytes_float64(m: LayerMatrix) -> int:
    """Memory the float64 working copy of this matrix needs."""
    return int(math.prod(m.weight.shape)) * 8
