"""Displayed layer names: the wrapper prefix left out by one rule (issue 21).

The names come from real models built from ``transformers`` configs (no download), wrapped the
ways users wrap them: a LightningModule attribute, DDP's ``module.``, ``torch.compile``'s
``_orig_mod.``, peft's ``base_model.model.``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ww_monitor.outputs.display_names import display_name_map, display_names, strip_wrappers
from ww_monitor.outputs.tensorboard_writer import custom_scalars_layout

transformers = pytest.importorskip("transformers")


class Holder(nn.Module):
    """What a LightningModule with ``self.model = ...`` looks like to named_modules()."""

    def __init__(self, model: nn.Module, attribute: str = "model"):
        super().__init__()
        setattr(self, attribute, model)


def matrices(model: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, Conv1D))]


def llama():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16)
    return transformers.BertForSequenceClassification(cfg)


def test_llama_in_a_lightning_module():
    names = matrices(Holder(llama()))
    assert "model.model.layers.0.self_attn.q_proj" in names and "model.lm_head" in names
    shown = display_names(names)
    assert shown[0] == "embed_tokens" and shown[-1] == "lm_head"
    assert "layers.1.mlp.down_proj" in shown and len(set(shown)) == len(names)
    assert not any(s.startswith("model.") for s in shown)


def test_gpt2_under_ddp_and_torch_compile():
    model = gpt2()
    plain = matrices(model)
    assert "transformer.h.0.attn.c_attn" in plain and "lm_head" in plain
    assert display_names(plain) == plain  # nothing to strip: transformer.* names a part of GPT-2
    compiled = torch.compile(model)  # lazy: nothing is compiled until it is called
    wrapped = matrices(Holder(compiled, "module"))
    assert wrapped[0].startswith("module._orig_mod.transformer.")
    assert display_names(wrapped) == plain


def test_bert_with_peft_lora():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(bert(), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    names = matrices(model)
    query = "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer"
    assert query in names
    shown = display_name_map(names)
    assert shown[query] == "bert.encoder.layer.0.attention.self.query.base_layer"
    assert all(not s.startswith("base_model") for s in shown.values())


@pytest.mark.parametrize("names, expected", [
    (["fc1", "fc2", "out"], ["fc1", "fc2", "out"]),  # no common prefix: unchanged
    (["0", "2", "4"], ["0", "2", "4"]),  # an nn.Sequential
    (["module.0", "module.2"], ["0", "2"]),  # DataParallel around an nn.Sequential
    (["model"], ["model"]),  # the last part always stays
    (["model.fc", "fc"], ["model.fc", "fc"]),  # stripping would merge two layers: shown in full
    (["module.model.fc", "module.fc"], ["model.fc", "fc"]),  # ... only the shared wrapper prefix goes
    (["encoder.model.fc", "decoder.model.fc"], ["encoder.model.fc", "decoder.model.fc"]),  # not leading
    ([], []),
])
def test_rule_edge_cases(names, expected):
    assert display_names(names) == expected


def test_strip_wrappers_one_name():
    assert strip_wrappers("_orig_mod.module.model.layers.3.mlp.up_proj") == "layers.3.mlp.up_proj"
    assert strip_wrappers("model.model") == "model"


def test_block_charts_titled_by_block():
    names = matrices(Holder(llama()))
    charts = custom_scalars_layout(names)["ww alpha per block"]
    assert list(charts) == ["alpha (top level)", "alpha layers.0", "alpha layers.1"]
    # the charts' tags keep the full names
    (regex,) = charts["alpha layers.0"][1]
    assert "ww/alpha/model\\.model\\.layers\\.0\\.self_attn\\.q_proj" in regex
    (top,) = charts["alpha (top level)"][1]
    assert "model\\.model\\.embed_tokens" in top and "model\\.lm_head" in top
