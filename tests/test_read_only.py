"""Watching must not change training: parametrized modules, buffers, RNG and autograd state."""

import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor as wwm

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*the trainer has no logger:RuntimeWarning",
                                        "ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")


def _wrap(kind: str, layer: nn.Module) -> nn.Module:
    if kind == "weight_norm":
        return parametrizations.weight_norm(layer)
    if kind == "spectral_norm":
        return parametrizations.spectral_norm(layer)
    if kind == "old_spectral_norm":
        return nn.utils.spectral_norm(layer)
    return layer


class MLP(pl.LightningModule):
    def __init__(self, kind: str):
        super().__init__()
        self.net = nn.Sequential(_wrap(kind, nn.Linear(16, 32)), nn.ReLU(), nn.Dropout(0.2),
                                 _wrap(kind, nn.Linear(32, 32)), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(kind: str, tmp_path, callback) -> tuple[dict, torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = MLP(kind)
    g = torch.Generator().manual_seed(1)
    data = DataLoader(TensorDataset(torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g)),
                      batch_size=16, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                         callbacks=[callback] if callback is not None else [])
    trainer.fit(model, data)
    return {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()


@pytest.mark.parametrize("kind", ["plain", "weight_norm", "spectral_norm", "old_spectral_norm"])
def test_seeded_run_is_bit_identical_with_and_without_the_callback(kind, tmp_path):
    ref_state, ref_rng = _fit(kind, tmp_path, None)
    cb = wwm.WeightWatcherCallback(every_n_train_steps=2, min_evals=4, on_lag="wait")
    state, rng = _fit(kind, tmp_path, cb)
    assert len(cb.history) >= 5 and cb.stats["snapshots_failed"] == 0
    assert "net.0" in cb.history[-1].layers  # the parametrized layers were analysed, not skipped
    assert state.keys() == ref_state.keys()
    for k in ref_state:  # weights and the spectral-norm _u/_v buffers
        assert torch.equal(state[k], ref_state[k]), k
    assert torch.equal(rng, ref_rng)


def _parametrized_zoo() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        parametrizations.spectral_norm(nn.Linear(24, 24)),
        parametrizations.weight_norm(nn.Linear(24, 24)),
        parametrizations.orthogonal(nn.Linear(24, 24)),
        nn.utils.spectral_norm(nn.Linear(24, 16)),
        nn.BatchNorm1d(16),
        nn.Linear(16, 16),
    ).train()


def test_analyze_leaves_buffers_rng_and_autograd_state_unchanged():
    model = _parametrized_zoo()
    model(torch.randn(8, 24)).sum().backward()  # grads present, spectral-norm vectors iterated once
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    training = [m.training for m in model.modules()]
    torch_rng, np_rng, py_rng = torch.get_rng_state(), np.random.get_state(), random.getstate()

    report = wwm.analyze(model, traps=True)

    assert {l.name for l in report.layers} >= {"0", "1", "2", "3", "5"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {n: p.grad for n, p in model.named_parameters() if p.grad is not None}.keys() == grads.keys()
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        if n in grads:
            assert torch.equal(p.grad, grads[n])
    assert [m.training for m in model.modules()] == training
    assert torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], np_rng[1]) and random.getstate() == py_rng


def test_parametrized_layers_are_read_as_the_model_uses_them():
    """The analysed matrix is the weight the module computes with: spectral norm divides by the
    stored sigma estimate (eval-mode semantics), orthogonal gives singular values 1."""
    model = _parametrized_zoo().eval()
    with torch.no_grad():
        model(torch.randn(4, 24))  # old-style hooks set `.weight` at each forward (eval: no power iteration)
        expected = {"0": model[0].weight, "1": model[1].weight, "2": model[2].weight, "3": model[3].weight}
    report = wwm.analyze(model, min_evals=4)
    for name, w in expected.items():
        s = torch.linalg.svdvals(w.double())
        assert report[name].lambda_max == pytest.approx(float(s.max() ** 2), rel=1e-5), name
    assert report["2"].lambda_max == pytest.approx(1.0, rel=1e-5)


def test_state_dict_of_parametrized_model_gives_the_same_numbers():
    model = _parametrized_zoo().eval()
    from_module = wwm.analyze(model)
    from_state = wwm.analyze(model.state_dict())
    for name in ("0", "1", "3", "5"):
        assert from_state[name].lambda_max == pytest.approx(from_module[name].lambda_max, rel=1e-6)
        assert from_state[name].alpha == pytest.approx(from_module[name].alpha, rel=1e-6)
    # orthogonal's stored tensor is not its weight: reported, not guessed
    (skip,) = [s for s in from_state.skipped if s.name == "2"]
    assert "cannot be rebuilt from a state dict" in skip.reason


def test_computed_weights_of_different_layers_are_never_taken_for_aliases():
    """Parametrized weights are computed on each read; two small ones (skipped for size) must not
    look like one tensor because the second reused the first one's freed memory."""
    model = nn.Sequential(*[parametrizations.weight_norm(nn.Linear(4, 4)) for _ in range(6)])
    report = wwm.analyze(model)
    assert sorted(s.name for s in report.skipped) == [str(i) for i in range(6)]
    assert all(s.aliases == () for s in report.skipped)
