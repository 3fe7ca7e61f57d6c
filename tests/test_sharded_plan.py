"""The plan of a sharded snapshot reads every weight as a shape-only stand-in: on real models
(every layer type, GPT-2 with its tied head, LLaMA with LoRA) it must select exactly what the
selection of the model itself selects, and the gather walk must reproduce every weight. No
process group is needed: without sharded parameters every rank reads the real tensors."""

import pytest
import torch
from torch import nn

from ww_monitor.analysis.analyze import AnalysisConfig, select_matrices
from ww_monitor.monitoring.model_view import is_stand_in, proxy, stand_in
from ww_monitor.monitoring.sharded import iter_full_matrices, plan_sharded

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CONFIGS = [AnalysisConfig(), AnalysisConfig(conv_mode="slices", min_evals=2), AnalysisConfig(peft=True),
           AnalysisConfig(peft="with_base", exclude=["mlp"]), AnalysisConfig(peft="auto")]


def _zoo():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 30), nn.Conv2d(3, 12, 3), nn.LSTM(10, 12), nn.MultiheadAttention(16, 2),
        nn.utils.parametrizations.spectral_norm(nn.Linear(12, 20)),
        nn.utils.parametrizations.weight_norm(nn.Linear(14, 22)),
        nn.utils.spectral_norm(nn.Linear(9, 18)), nn.Embedding(40, 10), nn.GRU(8, 9), nn.Linear(12, 40))


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama_lora():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p)
    return model


def _described(matrices):
    return [(m.name, m.kind, tuple(m.weight.shape), m.eig_scale, m.aliases, m.stored_dtype, m.frozen) for m in matrices]


@pytest.mark.parametrize("build", [_zoo, _gpt2, _llama_lora], ids=["layer-types", "gpt2", "llama-lora"])
def test_plan_from_shapes_selects_like_the_model_and_the_walk_reads_every_weight(build):
    model = build()
    for config in CONFIGS:
        reference, ref_skipped = select_matrices(model, config)
        plan = plan_sharded(model, config)
        assert all(is_stand_in(m.weight) for m in plan.matrices)  # no memory, nothing computed
        # names, kinds, shapes, tied weights, frozen (LoRA base weights do not require grad)
        assert _described(plan.matrices) == _described(reference)
        assert [(s.name, s.kind, s.shape, s.reason, s.aliases) for s in plan.skipped] == \
               [(s.name, s.kind, s.shape, s.reason, s.aliases) for s in ref_skipped]
        walked = [(m.name, m.weight.clone()) for m in iter_full_matrices(plan)]
        assert [n for n, _ in walked] == [m.name for m in reference]
        assert all(torch.equal(w, m.weight.detach()) for (_, w), m in zip(walked, reference))
        assert plan.materialiser.gathers == 0 and plan.materialiser.live_bytes == 0


def test_stand_ins_keep_views_apart_and_ties_together():
    a, b = stand_in((12, 5), torch.float32), stand_in((12, 5), torch.float32)
    q, k, v = a.chunk(3)
    assert len({q.data_ptr(), k.data_ptr(), v.data_ptr()}) == 3  # q/k/v are not aliases of each other
    assert a.data_ptr() != b.data_ptr() and a.data_ptr() == a.view(12, 5).data_ptr()
    assert not a.is_meta and a.device.type == "meta"  # read as a weight, holds no memory


def test_a_view_leaves_the_model_untouched():
    model = _zoo()
    before = {n: p for n, p in model.named_parameters()}
    view = proxy(model, lambda t: None if t is None else stand_in(t.shape, t.dtype))
    assert all(is_stand_in(p) for p in view.parameters())
    view[0].training = False  # the view's own flags
    assert model[0].training and all(p is before[n] for n, p in model.named_parameters())
    assert all(not is_stand_in(p) for p in model.parameters())


def test_a_sharded_snapshot_reserves_one_buffer_per_dtype_and_fills_it_layer_by_layer():
    from ww_monitor.monitoring.snapshot import SnapshotBuilder

    model = _zoo()
    model[-1].to(torch.bfloat16)  # a second dtype
    config = AnalysisConfig()
    reference, _ = select_matrices(model, config)
    plan = plan_sharded(model, config)
    builder = SnapshotBuilder(0, 0, 0)
    builder.reserve(plan.matrices)  # from shapes and dtypes: the weights are stand-ins
    assert builder.unfilled == [m.name for m in plan.matrices]
    for m in iter_full_matrices(plan):
        builder.fill(m)
        del m
    assert builder.unfilled == []
    snap = builder.finish()
    assert len(snap.buffers) == 1 and sorted(snap.buffers[0]) == ["bfloat16", "float32"]
    assert snap.nbytes == sum(m.weight.numel() * m.weight.element_size() for m in reference)
    assert [(m.name, m.weight.dtype) for m in snap.matrices()] == [(m.name, m.weight.dtype) for m in reference]
    assert all(torch.equal(a.weight, b.weight.detach()) for a, b in zip(snap.matrices(), reference))
