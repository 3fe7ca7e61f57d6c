"""Training-time extras of WeightWatcherCallback with a real pytorch_lightning Trainer on CPU:
``distance_from_init`` (a layer moved by a known amount), ``esd_shift``, weightwatcher's options
turned on in the callback, and a peft LoRA model (adapters analysed, no rank-collapse alert at
initialisation while lora_B is still zero)."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from scipy.stats import wasserstein_distance
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor
from ww_monitor.analysis.adapters import ZERO_UPDATE_REASON
from ww_monitor.errors import WWMonitorError

pl = pytest.importorskip("pytorch_lightning")

LR = 0.01
STEPS = 4


def _trainer(tmp_path, callback, logger, max_steps=STEPS):
    return pl.Trainer(max_steps=max_steps, callbacks=[callback], logger=logger, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      log_every_n_steps=1, num_sanity_val_steps=0, default_root_dir=str(tmp_path))


def _data(n=64, d=32, batch_size=16):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, d, generator=g), torch.randint(0, 4, (n,), generator=g)),
                      batch_size=batch_size)


def _rows(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _series(rows, tag):
    return {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}


class LinearDrift(pl.LightningModule):
    """loss = sum(C * fc.weight): plain SGD moves fc.weight by exactly -LR * C per step."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.fc = nn.Linear(32, 64, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(64, 32, generator=g) / 8)
        self.register_buffer("direction", torch.randn(64, 32, generator=g))
        self.w0 = self.fc.weight.detach().clone()

    def training_step(self, batch, batch_idx):
        return (self.direction * self.fc.weight).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_distance_from_init_and_esd_shift_on_a_layer_moved_by_a_known_amount(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=2, blocking=True,
                                          distance_from_init=True, figures_every_n_snapshots=None, alerts=False)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    model = LinearDrift()
    _trainer(tmp_path, cb, logger).fit(model, _data())
    rows = _rows(logger)
    distance = _series(rows, "ww/distance_from_init/fc")
    w0, c = model.w0.double(), model.direction.double()
    # W_t = W_0 - t * LR * C, so ||W_t - W_0|| / ||W_0|| = t * LR * ||C|| / ||W_0||.
    expected = {t: t * LR * float(c.norm() / w0.norm()) for t in (0, 2, 4)}
    assert sorted(distance) == [0, 2, 4]
    for t in (0, 2, 4):
        assert distance[t] == pytest.approx(expected[t], rel=1e-4, abs=1e-7), t
    # esd_shift: W1 distance of log10 eigenvalues between consecutive snapshots (none at the first).
    shift = _series(rows, "ww/esd_shift/fc")
    assert sorted(shift) == [2, 4]

    def log_esd(t):
        w = (w0 - t * LR * c).to(torch.float32).double()
        return np.log10(np.linalg.svd(w.numpy(), compute_uv=False) ** 2)

    for t in (2, 4):
        assert shift[t] == pytest.approx(wasserstein_distance(log_esd(t - 2), log_esd(t)), rel=1e-4), t
    df = cb.history.to_pandas()
    assert df["distance_from_init"].tolist() == pytest.approx([distance[t] for t in (0, 2, 4)])
    assert df["esd_shift"].tolist()[1:] == pytest.approx([shift[2], shift[4]]) and math.isnan(df["esd_shift"][0])
    assert set(cb._baseline) == {"fc"}  # the one extra copy: the analysed weights at the baseline
    assert cb.stats["baseline_bytes"] == 64 * 32 * 4


def test_options_in_the_callback_are_logged(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=2, blocking=True, detX=True,
                                          fix_fingers="clip_xmax", fit="TPL", esd_shift=False,
                                          figures_every_n_snapshots=None, alerts=False)
    assert cb.config.detX and cb.config.fit == "TPL" and cb.config.fix_fingers == "clip_xmax"
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    _trainer(tmp_path, cb, logger, max_steps=2).fit(LinearDrift(), _data())
    rows = _rows(logger)
    for tag in ("ww/detX_num/fc", "ww/Lambda/fc", "ww/num_fingers/fc"):
        assert sorted(_series(rows, tag)) == [0, 2], tag
    assert not _series(rows, "ww/esd_shift/fc") and not _series(rows, "ww/distance_from_init/fc")


@pytest.mark.parametrize("kwargs, match", [
    (dict(fix_fingers="peak"), "fix_fingers"), (dict(fit="LN"), "fit"), (dict(max_fingers=0), "max_fingers"),
    (dict(peft="adapters"), "peft"), (dict(distance_from_init=1), "distance_from_init"),
    (dict(fit="E_TPL", fix_fingers="clip_xmax"), "E_TPL"),
])
def test_callback_validates_the_new_options(kwargs, match):
    with pytest.raises(WWMonitorError, match=match):
        ww_monitor.WeightWatcherCallback(**kwargs)


class LoraClassifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        peft = pytest.importorskip("peft")
        torch.manual_seed(0)
        base = nn.Sequential()
        base.add_module("fc1", nn.Linear(32, 64))
        base.add_module("act", nn.ReLU())
        base.add_module("fc2", nn.Linear(64, 48))
        base.add_module("head", nn.Linear(48, 4))
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["fc1", "fc2"], lora_dropout=0.0)
        self.net = peft.get_peft_model(base, config)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_peft_lora_training_logs_adapters_without_rank_collapse_alert(tmp_path):
    pytest.importorskip("peft")
    from pytorch_lightning.loggers import CSVLogger

    alerts = []
    cb = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=2, blocking=True, peft=True,
                                          figures_every_n_snapshots=None, on_alert=alerts.append)
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    model = LoraClassifier()
    _trainer(tmp_path, cb, logger).fit(model, _data())
    adapters = ["net.base_model.model.fc1.lora_BA.default", "net.base_model.model.fc2.lora_BA.default"]
    # At initialisation lora_B is zero: the adapters are skipped with a reason, not analysed.
    first = cb.history[0]
    assert first.step == 0 and not first.layers
    assert dict(first.skipped) == {name: ZERO_UPDATE_REASON for name in adapters}
    # Afterwards their updates (8 eigenvalues each: the LoRA rank) are analysed and logged.
    assert cb.history.steps == [0, 2, 4]
    for rec in cb.history[1:]:
        assert list(rec.layers) == adapters
    rows = _rows(logger)
    for name in adapters:
        assert sorted(_series(rows, f"ww/log_norm/{name}")) == [2, 4]
        assert sorted(_series(rows, f"ww/stable_rank/{name}")) == [2, 4]
    assert not any(a.rule == "rank_collapse" for a in alerts + cb.alerts_fired)
    # The adapter ESD is the update's: compare with the singular values of scaling * B @ A.
    layer = model.net.base_model.model.fc1
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    report = ww_monitor.analyze(model, peft=True)
    ev = report["net.base_model.model.fc1.lora_BA.default"].eigenvalues
    expected = np.sort(torch.linalg.svdvals(delta.detach().double()).numpy() ** 2)[-8:]
    np.testing.assert_allclose(ev, expected, rtol=1e-5, atol=1e-12 * expected.max())


def test_default_peft_mode_never_analyses_the_zero_lora_factor(tmp_path):
    pytest.importorskip("peft")
    model = LoraClassifier()
    report = ww_monitor.analyze(model)
    names = [l.name for l in report.layers]
    assert names == ["net.base_model.model.fc1", "net.base_model.model.fc2"]  # base weights, own names
    assert [s.name for s in report.skipped] == ["net.base_model.model.head"]  # 4 eigenvalues < min_evals
    with_base = ww_monitor.analyze(model, peft="with_base")
    assert [l.name for l in with_base.layers if l.kind != "lora"] == [*names, "net.base_model.model.fc1.lora_W_plus_AB.default", "net.base_model.model.fc2.lora_W_plus_AB.default"]
    assert {s.reason for s in with_base.skipped if "lora" in s.name} == {ZERO_UPDATE_REASON}
    # The merged weight is the base weight while B is zero.
    merged = with_base["net.base_model.model.fc1.lora_W_plus_AB.default"]
    assert merged.log_norm == pytest.approx(with_base["net.base_model.model.fc1"].log_norm, rel=1e-12)
