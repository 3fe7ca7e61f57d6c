"""Layer extraction on real torch.nn modules: every supported type, names, limits, selection."""

import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis.layers import clean_name


def _names(report):
    return [l.name for l in report.layers]


def test_linear_and_orientation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(40, 100), nn.Linear(100, 30))
    r = wwm.analyze(m)
    assert _names(r) == ["0", "1"]
    a, b = r.layers
    assert (a.N, a.M, a.num_evals, a.kind) == (100, 40, 40, "linear")
    assert (b.N, b.M, b.Q) == (100, 30, pytest.approx(100 / 30))
    # lambda_max is the squared spectral norm of the raw weight (no 1/N normalisation).
    expected = torch.linalg.matrix_norm(m[0].weight.double(), ord=2).item() ** 2
    assert a.lambda_max == pytest.approx(expected, rel=1e-10)


def test_hf_conv1d_weight_is_transposed_linear():
    class Conv1D(nn.Module):  # the Hugging Face GPT-2 layout: weight is (in, out)
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    torch.manual_seed(1)
    hf = Conv1D(64, 32)
    lin = nn.Linear(32, 64)
    with torch.no_grad():
        lin.weight.copy_(hf.weight.T)
    a = wwm.analyze(nn.ModuleDict({"c_attn": hf})).layers[0]
    b = wwm.analyze(nn.ModuleDict({"c_attn": lin})).layers[0]
    assert a.kind == "conv1d_hf" and b.kind == "linear"
    assert a.alpha == pytest.approx(b.alpha, rel=1e-9)
    assert a.log_norm == pytest.approx(b.log_norm, rel=1e-9)


def test_embedding():
    r = wwm.analyze(nn.ModuleDict({"tok": nn.Embedding(500, 48)}))
    (l,) = r.layers
    assert (l.name, l.kind, l.N, l.M) == ("tok", "embedding", 500, 48)


@pytest.mark.parametrize("conv, slices", [(nn.Conv1d(8, 16, 5), 5), (nn.Conv2d(8, 16, 3), 9), (nn.Conv3d(8, 16, (2, 2, 3)), 12)])
def test_conv_pooled_halves_slice_eigenvalues(conv, slices):
    r = wwm.analyze(nn.ModuleDict({"conv": conv}))
    (l,) = r.layers
    assert l.num_slices == slices and l.num_evals == 8 * slices and (l.N, l.M) == (16, 8)
    w = conv.weight.detach().double().reshape(16, 8, -1)
    expected = sorted(
        (torch.linalg.svdvals(w[:, :, i]) ** 2 / 2).tolist()[j] for i in range(slices) for j in range(8)
    )
    assert l.eigenvalues.tolist() == pytest.approx(expected, rel=1e-9)


def test_conv_slices_mode_gives_one_esd_per_kernel_position():
    r = wwm.analyze(nn.ModuleDict({"conv": nn.Conv2d(16, 32, 3)}), conv_mode="slices")
    assert _names(r) == [f"conv.slice{i}" for i in range(9)]
    assert all(l.num_evals == 16 for l in r.layers)


def test_multihead_attention_is_split_into_q_k_v_and_out_proj():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(64, 4)
    r = wwm.analyze(nn.ModuleDict({"attn": mha}))
    assert _names(r) == ["attn.q", "attn.k", "attn.v", "attn.out_proj"]
    assert {l.kind for l in r.layers} == {"attention"}
    q = mha.in_proj_weight.detach()[:64].double()
    assert r["attn.q"].lambda_max == pytest.approx(torch.linalg.matrix_norm(q, 2).item() ** 2, rel=1e-9)


def test_multihead_attention_with_separate_projections():
    mha = nn.MultiheadAttention(32, 4, kdim=16, vdim=24)
    r = wwm.analyze(nn.ModuleDict({"attn": mha}))
    assert _names(r) == ["attn.q", "attn.k", "attn.v", "attn.out_proj"]
    assert (r["attn.k"].N, r["attn.k"].M) == (32, 16)
    assert (r["attn.v"].N, r["attn.v"].M) == (32, 24)


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, "ifgo"), (nn.GRU, "rzn"), (nn.RNN, None)])
def test_recurrent_weights_split_per_gate(cls, gates):
    rnn = cls(16, 32, num_layers=2)
    r = wwm.analyze(nn.ModuleDict({"rnn": rnn}))
    names = _names(r)
    if gates is None:
        assert names == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1"]
    else:
        assert names[: len(gates)] == [f"rnn.weight_ih_l0.{g}" for g in gates]
        assert len(names) == 4 * len(gates)
    assert {l.kind for l in r.layers} == {"rnn"}
    # State dicts carry no module types: the gate count is inferred from the shapes.
    from_sd = wwm.analyze(rnn.state_dict())
    assert [l.name for l in from_sd.layers] == [n[len("rnn."):] for n in names]


def test_norms_biases_and_1d_parameters_are_never_analysed():
    m = nn.Sequential(nn.Linear(20, 20), nn.LayerNorm(20), nn.BatchNorm1d(20))
    r = wwm.analyze(m)
    assert _names(r) == ["0"] and r.skipped == []


def test_unknown_2d_weight_is_reported_until_included():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(30, 20))

    model = nn.ModuleDict({"custom": Custom(), "fc": nn.Linear(20, 20)})
    r = wwm.analyze(model)
    assert _names(r) == ["fc"]
    assert [s.name for s in r.skipped] == ["custom"] and "include" in r.skipped[0].reason
    r2 = wwm.analyze(model, include=["custom", "fc"])
    assert sorted(_names(r2)) == ["custom", "fc"]


def test_size_limits_report_skipped_layers_with_reason():
    model = nn.ModuleDict({"tiny": nn.Linear(5, 4), "ok": nn.Linear(30, 20), "wide": nn.Linear(20, 300)})
    r = wwm.analyze(model, max_n=200)
    assert _names(r) == ["ok"]
    reasons = {s.name: s.reason for s in r.skipped}
    assert "min_evals=8" in reasons["tiny"]
    assert "max_n=200" in reasons["wide"]
    r = wwm.analyze(model, max_evals=10)
    assert "max_evals=10" in {s.name: s.reason for s in r.skipped}["ok"]
    r = wwm.analyze(model, max_matrix_bytes=1000)
    assert "max_matrix_bytes" in {s.name: s.reason for s in r.skipped}["ok"]


def test_include_exclude_and_kinds():
    model = nn.ModuleDict({
        "encoder": nn.ModuleDict({"fc1": nn.Linear(30, 30), "fc2": nn.Linear(30, 30)}),
        "conv": nn.Conv2d(8, 8, 3),
        "emb": nn.Embedding(100, 16),
    })
    assert _names(wwm.analyze(model, include=r"encoder")) == ["encoder.fc1", "encoder.fc2"]
    assert _names(wwm.analyze(model, exclude=[r"fc2$", "emb"])) == ["encoder.fc1", "conv"]
    assert _names(wwm.analyze(model, kinds=["conv2d", "embedding"])) == ["conv", "emb"]
    with pytest.raises(wwm.WWMonitorError, match="unknown layer kind"):
        wwm.analyze(model, kinds=["dense"])
    with pytest.raises(wwm.WWMonitorError, match="not a valid regular expression"):
        wwm.analyze(model, include="(")


def test_wrapper_prefixes_are_stripped():
    assert clean_name("_orig_mod.module.encoder.layer.0") == "encoder.layer.0"
    assert clean_name("model.module.fc") == "model.fc"
    model = nn.Sequential(nn.Linear(16, 16))
    compiled_like = nn.ModuleDict({"_orig_mod": nn.ModuleDict({"module": model})})
    assert _names(wwm.analyze(compiled_like)) == ["0"]
    sd = {"module._orig_mod.fc.weight": torch.randn(16, 16)}
    assert _names(wwm.analyze(sd)) == ["fc"]


def test_state_dict_and_module_give_the_same_numbers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(4, 8, 3))
    a, b = wwm.analyze(model), wwm.analyze(model.state_dict())
    assert _names(a) == _names(b)
    for x, y in zip(a.layers, b.layers):
        assert x.alpha == pytest.approx(y.alpha, rel=1e-12)
        assert x.log_norm == pytest.approx(y.log_norm, rel=1e-12)
