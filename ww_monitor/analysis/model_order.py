"""The module order of a state dict whose file does not keep it (safetensors sorts its header).

:func:`model_order_key` sorts dotted tensor names part by part: numbers as numbers
(``layers.2`` before ``layers.10``) and, among siblings, names whose role the common transformer
and CNN naming conventions make clear in the order those models register them: embeddings first,
then encoder before decoder, attention before the MLP within a block, query, key, value, output
within attention, gate, up, down within the MLP, and output heads (``lm_head``, ``classifier``)
last. Other names keep their natural (alphabetical, numbers as numbers) order between the
attention and the MLP ranks. So a LLaMA, GPT-2, BERT, T5 or NeoX safetensors file lists its
layers in the order of the module, like its ``.pt`` file; a module whose names say nothing keeps
the plain natural order.
"""

from __future__ import annotations

import re

__all__ = ["model_order_key", "natural_key"]

#: Marks the rank of names with no known role among :data:`ROLE_GROUPS`.
ORDINARY = None

#: Sibling names by role, earliest first (compared lower-cased); each group is one rank. Where one
#: name plays two roles (``c_proj``: GPT-2's attention and MLP output; ``output``: BERT's attention
#: and FFN output; ``wo``: T5's FFN and Meta LLaMA's attention output), it is ranked where it is
#: right in both contexts: after its inputs. ``w1``/``w2``/``w3`` are left to the natural order,
#: which is Meta LLaMA's registration order.
ROLE_GROUPS = (
    # token embeddings, then positions, then token types
    (
        "embed_tokens",
        "wte",
        "word_embeddings",
        "tok_embeddings",
        "embed",
        "embedding",
        "embeddings",
        "shared",
        "patch_embed",
        "patch_embedding",
        "patch_embeddings",
    ),
    ("wpe", "embed_positions", "position_embeddings", "pos_embed", "positional_embedding"),
    ("token_type_embeddings",),
    ("encoder",),
    ("decoder",),
    # attention (self before cross); within it query (or fused q/k/v), key, value, output
    ("self_attn", "attn", "attention", "self_attention", "selfattention"),
    ("encoder_attn", "cross_attn", "crossattention", "encdecattention"),
    (
        "q_proj",
        "q",
        "query",
        "wq",
        "c_attn",
        "qkv",
        "qkv_proj",
        "query_key_value",
        "wqkv",
        "in_proj",
        "in_proj_weight",
        "self",
    ),
    ("k_proj", "k", "key", "wk"),
    ("v_proj", "v", "value", "wv"),
    ("o_proj", "o", "out_proj"),
    ORDINARY,
    # the MLP: its container or input projection (gate before up), then its output projection
    (
        "mlp",
        "feed_forward",
        "ffn",
        "ff",
        "intermediate",
        "densereludense",
        "gate_proj",
        "c_fc",
        "fc1",
        "wi",
        "dense_h_to_4h",
    ),
    ("up_proj",),
    ("down_proj", "c_proj", "fc2", "wo", "dense_4h_to_h", "output"),
    # output heads
    ("lm_head", "head", "classifier", "score", "qa_outputs"),
)
_RANK = {name: rank for rank, group in enumerate(ROLE_GROUPS) if group is not ORDINARY for name in group}
_ORDINARY_RANK = ROLE_GROUPS.index(ORDINARY)


def natural_key(name: str) -> tuple:
    """Sort key that compares the digit runs of ``name`` as numbers: ``layers.2.fc`` sorts before
    ``layers.10.fc`` (plain string order puts 10 first)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def model_order_key(name: str) -> tuple:
    """Sort key of a dotted tensor name in module order where the names tell it (module docstring):
    per dotted part, numbers as numbers first, then named parts by role rank, then naturally."""
    key = []
    for part in name.split("."):
        if part.isdigit():
            key.append((0, int(part), ()))
        else:
            key.append((1, _RANK.get(part.lower(), _ORDINARY_RANK), natural_key(part)))
    return tuple(key)
