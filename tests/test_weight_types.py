"""Every weight dtype/layout is analysed or skipped with a reason; tied weights count once."""

import warnings

import pytest
import torch
from torch import nn

import ww_monitor as wwm

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:.*quantize_per_tensor.*:UserWarning",
                                        "ignore:.*the trainer has no logger:RuntimeWarning",
                                        "ignore:ComplexHalf support is experimental:UserWarning")


def _with_weight(w: torch.Tensor, shape=(48, 32)) -> nn.Linear:
    layer = nn.Linear(shape[1], shape[0])
    layer.weight = nn.Parameter(w, requires_grad=False)
    return layer


def _dense(seed=0, shape=(48, 32)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _all_dtypes():
    return sorted({v for v in vars(torch).values() if isinstance(v, torch.dtype)}, key=str)


def test_every_torch_dtype_is_analysed_or_skipped_with_a_reason():
    layers, expected = {}, set()
    for i, dtype in enumerate(_all_dtypes()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # complex32 is "experimental"
                w = (_dense(i) * 4).to(dtype) if not dtype.is_complex else torch.complex(_dense(i), _dense(i + 1)).to(dtype)
        except (RuntimeError, TypeError, NotImplementedError):
            continue  # torch cannot even create such a tensor from floats (packed sub-byte types)
        layers[f"l{i}"] = _with_weight(w)
        expected.add((f"l{i}", str(dtype)))
    assert len(layers) >= 20
    report = wwm.analyze(nn.ModuleDict(layers))
    analysed = {l.name: l for l in report.layers}
    skipped = {s.name: s for s in report.skipped}
    assert analysed.keys() | skipped.keys() == set(layers)  # nothing disappears
    assert not analysed.keys() & skipped.keys()
    for name, dtype in expected:
        if name in skipped:
            assert skipped[name].reason, dtype
    by_dtype = {dtype: name for name, dtype in expected}
    for dtype in ("torch.float8_e4m3fn", "torch.float8_e5m2", "torch.bfloat16", "torch.float16", "torch.float64"):
        assert by_dtype[dtype] in analysed, dtype
    assert analysed[by_dtype["torch.float8_e4m3fn"]].dtype == "float8_e4m3fn"
    for dtype in ("torch.int8", "torch.complex64", "torch.bool"):
        assert by_dtype[dtype] in skipped, dtype
    assert "complex" in skipped[by_dtype["torch.complex64"]].reason
    assert "int8" in skipped[by_dtype["torch.int8"]].reason


def test_float8_layer_matches_its_float32_values():
    w8 = _dense().to(torch.float8_e4m3fn)
    r8 = wwm.analyze(nn.Sequential(_with_weight(w8)))
    r32 = wwm.analyze(nn.Sequential(_with_weight(w8.float())))
    assert r8["0"].lambda_max == pytest.approx(r32["0"].lambda_max, rel=1e-12)
    assert r8["0"].alpha == pytest.approx(r32["0"].alpha, rel=1e-12)


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_sparse_weights_are_analysed_as_their_dense_matrix(layout):
    dense = _dense() * (torch.rand(48, 32, generator=torch.Generator().manual_seed(3)) < 0.3)
    sparse = dense.to_sparse() if layout == "coo" else dense.to_sparse_csr()
    r_sparse = wwm.analyze(nn.Sequential(_with_weight(sparse)))
    r_dense = wwm.analyze(nn.Sequential(_with_weight(dense)))
    assert r_sparse["0"].lambda_max == pytest.approx(r_dense["0"].lambda_max, rel=1e-12)
    assert r_sparse["0"].alpha == pytest.approx(r_dense["0"].alpha, rel=1e-12)


def test_quantize_dynamic_model_is_analysed_through_its_dequantized_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    rq, rf = wwm.analyze(quantized), wwm.analyze(model)
    assert [(l.name, l.kind) for l in rq.layers] == [("0", "linear"), ("2", "linear")]
    assert rq.skipped == []
    for name in ("0", "2"):  # 8-bit rounding moves the spectrum a little, not more
        assert rq[name].lambda_max == pytest.approx(rf[name].lambda_max, rel=0.02)
        assert rq[name].log_norm == pytest.approx(rf[name].log_norm, abs=0.01)


class TiedLM(nn.Module):
    """Token embedding shared with the output head (as in GPT-2), and a second shared Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.block = nn.Linear(32, 32)
        self.block_again = self.block  # the same module registered twice
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight


def test_tied_weights_are_analysed_once_as_aliases():
    model = TiedLM()
    report = wwm.analyze(model)
    assert [(l.name, l.aliases) for l in report.layers] == [("emb", ("head",)), ("block", ("block_again",))]
    assert report.summary()["num_layers"] == 2
    # a state dict keeps both names pointing at one storage: the same answer
    from_state = wwm.analyze(model.state_dict())
    assert [(l.name, l.kind, l.aliases) for l in from_state.layers] == [(l.name, l.kind, l.aliases) for l in report.layers]
    assert from_state["emb"].alpha == report["emb"].alpha
    assert '"aliases": ["head"]' in report.to_json()


def test_tied_weight_skipped_for_size_lists_its_aliases():
    model = TiedLM()
    report = wwm.analyze(model, max_n=50)
    (skip,) = [s for s in report.skipped if s.name == "emb"]
    assert skip.aliases == ("head",) and "max_n=50" in skip.reason
    assert all(s.name != "head" for s in report.skipped)


class Mixed(pl.LightningModule):
    """Trains a float32 Linear while holding frozen float8, sparse, complex and tied weights."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.fp8 = _with_weight(_dense(1, (32, 32)).to(torch.float8_e4m3fn), (32, 32))
        self.sparse = _with_weight(_dense(2, (32, 32)).to_sparse(), (32, 32))
        self.cplx = _with_weight(torch.complex(_dense(3, (32, 32)), _dense(4, (32, 32))), (32, 32))
        self.tied = nn.Linear(32, 32, bias=False)
        self.tied.weight = self.fc.weight
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.fc(x)) + x @ self.fp8.weight.float().T + torch.sparse.mm(self.sparse.weight, x.T).T
        return self.out(torch.relu(self.tied(h)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05)


def test_callback_handles_every_weight_type_and_copies_tied_weights_once(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16)
    cb = wwm.WeightWatcherCallback(blocking=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[cb])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Mixed(), data)
    assert cb.stats["snapshots_failed"] == 0 and len(cb.history) == 3
    first, record = cb.history[0], cb.history[-1]
    # fc, fp8 (as float32) and the densified sparse weight at the baseline; fp8 and sparse are
    # frozen (requires_grad=False), so later snapshots carry them forward instead of copying them
    assert set(first.layers) == {"fc", "fp8", "sparse"} and set(record.layers) == {"fc"}
    reasons = dict(record.skipped)
    assert "complex" in reasons["cplx"] and "min_evals" in reasons["out"]
    # the last snapshot copied fc alone (tied `tied` copied once); 2 frozen layers x 2 snapshots carried
    assert cb.stats["snapshot_bytes"] == 32 * 32 * 4
    assert cb.stats["layers_carried"] == 4 and cb.stats["carried_bytes"] == 4 * 32 * 32 * 4
    messages = [str(w.message) for w in caught]
    assert sum("layer cplx not analysed" in m for m in messages) == 1  # once per layer, not per snapshot
