"""SpectralBalancer / TempBalance / AlphaDecay in real Lightning Trainers on CPU.

The learning rate each optimizer step really uses is read by an optimizer step pre-hook
registered after the balancer's (so it sees the scaled value), and compared with factor x the
schedule computed independently on a separate optimizer; the factors are compared with the
mapping of the alphas, and the alphas with the Hill estimate of the weights' SVD.
"""

import csv
import math
import os

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ww_monitor
from ww_monitor.balancing import hill_alpha, linear_factors
from ww_monitor.balancing.groups import expand_schedulers, find_units, split_param_groups
from ww_monitor.errors import WWMonitorError

pl = pytest.importorskip("pytorch_lightning")

UNITS = ["net.0", "net.2", "net.5", "net.7", "net.9"]  # net.3 (BatchNorm) follows net.2
SAMPLES, BATCH, EPOCHS = 256, 64, 3
STEPS_PER_EPOCH = SAMPLES // BATCH
LR = 0.1


def make_net():
    # Eigenvalue counts: 32 (first), 96, 80, 64, 10 (last); the three middle layers are balanced.
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 96), nn.BatchNorm1d(96), nn.ReLU(),
                         nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 10))


SCHEDULERS = {
    "StepLR": lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n),
    "OneCycleLR": lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=n + 1),
    "LambdaLR-warmup": lambda opt, n: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5)),
}


class Net(pl.LightningModule):
    def __init__(self, scheduler=None, total_steps=EPOCHS * STEPS_PER_EPOCH, optimizer="sgd", weight_decay=0.0):
        super().__init__()
        self.net = make_net()
        self.scheduler, self.total_steps, self.optimizer_name, self.wd = scheduler, total_steps, optimizer, weight_decay

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=self.wd)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9, weight_decay=self.wd)
        if self.scheduler is None:
            return opt
        sched = SCHEDULERS[self.scheduler](opt, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def data():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(SAMPLES, 32, generator=g), torch.randint(0, 10, (SAMPLES,), generator=g)),
                      batch_size=BATCH)


class Probe(pl.Callback):
    """Records what every optimizer step uses, and the Hill alpha of each layer's SVD whenever the
    balancer updates (placed after it, so it sees the balancer's state of that hook)."""

    def __init__(self):
        self.seen, self.oracle = [], {}

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        opt.register_step_pre_hook(lambda o, a, k: self.seen.append(
            (trainer.global_step, [g["lr"] for g in o.param_groups], [g["weight_decay"] for g in o.param_groups])))
        self._alphas(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self._alphas(trainer, pl_module)

    def _alphas(self, trainer, pl_module):
        with torch.no_grad():
            self.oracle[trainer.global_step] = {
                name: hill_alpha(torch.linalg.svdvals(m.weight.double()).square().numpy())
                for name, m in pl_module.named_modules() if isinstance(m, nn.Linear)}


def fit(callbacks, module, tmp_path, max_epochs=EPOCHS, logger=False, **kw):
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         num_sanity_val_steps=0, log_every_n_steps=1, **kw)
    trainer.fit(module, data())
    return trainer


def reference_schedule(name, n_steps, lr=LR):
    """The lr the schedule alone gives at each step, on an unrelated one-parameter optimizer
    (``name``: one of SCHEDULERS, or a factory ``fn(optimizer, n_steps)``)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    sched = (SCHEDULERS[name] if isinstance(name, str) else name)(opt, n_steps)
    out = []
    for _ in range(n_steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def factors_at(history, step):
    rec = [r for r in history if r.step <= step][-1]
    return {n: f for n, f in zip(rec.layers, rec.factors)}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_lr_is_factor_times_schedule(tmp_path, scheduler):
    torch.manual_seed(0)
    tb, probe = ww_monitor.TempBalance(), Probe()
    logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version=0)
    trainer = fit([tb, probe], Net(scheduler), tmp_path, logger=logger)
    n_steps = EPOCHS * STEPS_PER_EPOCH
    ref = reference_schedule(scheduler, n_steps)

    # one record at train start and one per epoch end, at those steps
    assert [r.step for r in tb.history] == [k * STEPS_PER_EPOCH for k in range(EPOCHS + 1)]
    assert tb.group_layers() == UNITS
    for rec in tb.history:
        assert list(rec.layers) == UNITS
        # first/last layer and net.0 (32 eigenvalues < 50) keep 1; the others are mapped
        assert list(rec.balanced) == [False, True, True, True, False]
        alphas = np.array(rec.alphas)
        expected = np.ones(len(UNITS))
        expected[1:4] = linear_factors(alphas[1:4], 0.5, 1.5)
        assert np.allclose(rec.factors, expected, rtol=1e-12)
        assert sorted(rec.factors[1:4]) != [1.0, 1.0, 1.0]  # the spread is real: 0.5 and 1.5 are hit
        # the alphas are the Hill estimates of the weights at that step (SVD route, here independent)
        oracle = probe.oracle[rec.step]
        assert rec.alphas == pytest.approx([oracle[n] for n in UNITS], rel=1e-6)

    # every step: lr of each layer's group = factor in force x scheduled lr, never compounded
    assert len(probe.seen) == n_steps
    for k, (step, lrs, _) in enumerate(probe.seen):
        assert step == k
        factors = factors_at(tb.history, step)
        assert lrs == pytest.approx([factors[n] * ref[k] for n in UNITS], rel=1e-12, abs=1e-15)
    # outside the step the optimizer has its own single group, holding the plain schedule
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == pytest.approx([ref[n_steps]])

    # the factors and alphas are logged at the update steps
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    logged = [(int(r["step"]), float(r["ww/balance/net.5"])) for r in rows if r.get("ww/balance/net.5")]
    assert logged == [(r.step, pytest.approx(r.factor_map()["net.5"])) for r in tb.history]
    assert any(r.get("ww/balance_alpha/net.2") for r in rows)


def test_groups_follow_layers_and_norms_keep_user_settings():
    torch.manual_seed(0)
    net = nn.Module()
    net.net = make_net()
    decay = [p for n, p in net.named_parameters() if n.endswith("weight") and p.ndim == 2]
    no_decay = [p for n, p in net.named_parameters() if not (n.endswith("weight") and p.ndim == 2)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-3}, {"params": no_decay, "lr": 0.05}],
                          lr=LR, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 1.0])
    x = torch.randn(16, 32)
    net.net(x).sum().backward()
    opt.step()  # the optimizer has state before the split
    state = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.parameters()}
    units = find_units(net)
    assert [u.name for u in units] == UNITS and units[1].followers == ["net.3"]
    plan = split_param_groups(opt, units)
    expand_schedulers([sched], opt, [o for o, _ in plan], 2)
    assert plan == [(0, n) for n in UNITS] + [(1, n) for n in UNITS]
    for (origin, unit), group in zip(plan, opt.param_groups):
        assert group["weight_decay"] == (1e-3 if origin == 0 else 0.0)
        assert group["lr"] == (LR if origin == 0 else 0.05)
        mod = dict(net.named_modules())
        owned = {id(p) for p in mod[unit].parameters()} | ({id(p) for p in mod["net.3"].parameters()}
                                                          if unit == "net.2" else set())
        assert {id(p) for p in group["params"]} <= owned
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], state[id(p)]) for p in net.parameters())
    # the scheduler drives each new group like its origin
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([LR * 0.5] * 5 + [0.05] * 5)


def test_resume_restores_factors_groups_and_state(tmp_path):
    """2 epochs + resume for 2 more == 4 epochs straight (no shuffling, so bitwise comparable)."""
    torch.manual_seed(0)
    init = make_net().state_dict()

    def run(max_epochs, ckpt=None, save=None):
        module = Net("StepLR", total_steps=4 * STEPS_PER_EPOCH)
        module.net.load_state_dict(init)
        tb, probe = ww_monitor.TempBalance(), Probe()
        trainer = pl.Trainer(max_epochs=max_epochs, callbacks=[tb, probe], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
        trainer.fit(module, data(), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module, tb, probe, trainer

    straight, tb_a, probe_a, _ = run(4)
    path = str(tmp_path / "half.ckpt")
    _, tb_half, _, _ = run(2, save=path)
    resumed, tb_b, probe_b, trainer_b = run(4, ckpt=path)

    assert [r.step for r in tb_b.history] == [r.step for r in tb_a.history] == [0, 4, 8, 12, 16]
    assert tb_b.history[2].factors == tb_half.history[2].factors  # restored, not recomputed
    # the optimizer kept its own single group (the per-layer groups exist only during the step)
    assert tb_b.group_layers() == UNITS and len(trainer_b.optimizers[0].param_groups) == 1
    # the first resumed step used the restored factors and the restored schedule
    assert probe_b.seen[0][0] == 8 and probe_b.seen[0][1] == pytest.approx(probe_a.seen[8][1], rel=1e-12)
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)


def test_analysis_failure_keeps_factors_with_a_warning(tmp_path, monkeypatch):
    import ww_monitor.balancing.core as cb_module

    real, calls = cb_module.own_alphas, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("eigensolver exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(cb_module, "own_alphas", flaky)
    torch.manual_seed(0)
    tb, probe = ww_monitor.TempBalance(), Probe()
    with pytest.warns(RuntimeWarning, match="eigensolver exploded.*stay as they were"):
        trainer = fit([tb, probe], Net(), tmp_path)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH  # training went on
    assert [r.step for r in tb.history] == [0, 8, 12] and tb.stats["failures"] == 1
    # during epoch 2 (steps 4..7) the factors of train start were still applied
    first = tb.history[0].factor_map()
    for _step, lrs, _ in probe.seen[4:8]:
        assert lrs == pytest.approx([first[n] * LR for n in UNITS])


def test_reuses_the_weightwatcher_callback_analysis(tmp_path, monkeypatch):
    import ww_monitor.balancing.core as cb_module

    def never(*args, **kwargs):
        raise AssertionError("alpha computed twice")

    monkeypatch.setattr(cb_module, "own_alphas", never)
    torch.manual_seed(0)
    ww = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None, alerts=False)
    tb_ww = ww_monitor.TempBalance(estimator="ww")
    ad_hill = ww_monitor.AlphaDecay(estimator="hill_median", every_n_epochs=1, every_n_train_steps=None)
    fit([ww, tb_ww, ad_hill], Net(weight_decay=1e-3), tmp_path, max_epochs=2)
    assert tb_ww.stats["failures"] == ad_hill.stats["failures"] == 0
    assert [r.source for r in tb_ww.history] == ["monitor:ww@0", "monitor:ww@4", "monitor:ww@8"]
    for rec in tb_ww.history:
        snap = next(s for s in ww.history if s.step == rec.step)
        ww_alpha = snap.metric("alpha")
        for name, alpha, balanced in zip(rec.layers, rec.alphas, rec.balanced):
            if balanced:
                assert alpha == ww_alpha[name]
    assert ad_hill.history[-1].source == "monitor:hill_median@8"
    assert all(math.isfinite(a) for a in ad_hill.history[-1].alphas)
    with pytest.raises(WWMonitorError, match="would multiply"):
        fit([ww_monitor.TempBalance(), ww_monitor.SpectralBalancer(mapping="sqrt")], Net(), tmp_path, max_epochs=1)


def test_alphadecay_scales_weight_decay_only(tmp_path):
    torch.manual_seed(0)
    ad, probe = ww_monitor.AlphaDecay(every_n_train_steps=3), Probe()
    fit([ad, probe], Net(optimizer="adamw", weight_decay=0.1), tmp_path, max_epochs=2)
    assert [r.step for r in ad.history] == [0, 3, 6]
    for rec in ad.history:
        alphas = np.array(rec.alphas)
        assert rec.factors[1:4] == pytest.approx(linear_factors(alphas[1:4], 0.666, 3.0))
    for step, lrs, wds in probe.seen:
        factors = factors_at(ad.history, step)
        assert lrs == pytest.approx([1e-3] * len(UNITS))
        assert wds == pytest.approx([0.1 * factors[n] for n in UNITS])
    # less decay for the heavier-tailed (smaller alpha) layer
    rec = ad.history[-1]
    lo, hi = np.argmin(rec.alphas[1:4]) + 1, np.argmax(rec.alphas[1:4]) + 1
    assert rec.factors[lo] == pytest.approx(0.666) and rec.factors[hi] == pytest.approx(3.0)


def test_lightning_pytorch_flavour(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from ww_monitor.lightning import AlphaDecay, SpectralBalancer, TempBalance

    for cls in (SpectralBalancer, TempBalance, AlphaDecay):
        assert issubclass(cls, L.Callback) and not issubclass(cls, pl.Callback)
    assert issubclass(ww_monitor.TempBalance, pl.Callback)

    class LNet(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_net()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    balancer = SpectralBalancer(mapping="sigmoid", every_n_epochs=1)
    trainer = L.Trainer(max_epochs=1, callbacks=[balancer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(LNet(), data())
    assert len(balancer.history) == 2 and balancer.group_layers() == UNITS
    assert balancer.effective_values() == pytest.approx([LR * balancer.factors.get(n, 1.0) for n in UNITS])


@pytest.mark.parametrize("kwargs, argument", [
    ({"scale": "momentum"}, "scale"), ({"mapping": "cubic"}, "mapping"), ({"estimator": "svd"}, "estimator"),
    ({"factor_range": (1.5, 0.5)}, "factor_range"), ({"factor_range": 2}, "factor_range"),
    ({"every_n_epochs": -1}, "every_n_epochs"), ({"every_n_epochs": 0}, "is not a schedule"),
    ({"every_n_train_steps": 0}, "every_n_train_steps"),
    ({"min_evals": 1}, "min_evals"), ({"xmin_pos": 0.5}, "xmin_pos"), ({"include": "("}, "include"),
    ({"kinds": ["linear", "mlp"]}, "kinds"), ({"sigmoid_temperature": 0}, "sigmoid_temperature"),
    ({"follow_norms": "yes"}, "follow_norms"),
    ({"every_n_epochs": None, "at_train_start": False}, "every_n_epochs"),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(WWMonitorError, match=argument):
        ww_monitor.SpectralBalancer(**kwargs)


def test_weight_decay_needs_an_optimizer_setting(tmp_path):
    class NoWD(Net):
        def configure_optimizers(self):
            return torch.optim.Adadelta(self.parameters())

    # Adadelta has weight_decay; Rprop does not
    class Rprop(Net):
        def configure_optimizers(self):
            return torch.optim.Rprop(self.parameters())

    fit([ww_monitor.AlphaDecay()], NoWD(), tmp_path, max_epochs=1)
    with pytest.raises(WWMonitorError, match="weight_decay"):
        fit([ww_monitor.AlphaDecay()], Rprop(), tmp_path, max_epochs=1)


def test_config_file_instantiates_and_runs(tmp_path):
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("jsonargparse")
    pytest.importorskip("sklearn")
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs" / "tempbalance.yaml").read_text())
    classes = [c["class_path"] for c in cfg["trainer"]["callbacks"]]
    assert classes == ["ww_monitor.WeightWatcherCallback", "ww_monitor.TempBalance"]
    ww_monitor.TempBalance(**cfg["trainer"]["callbacks"][1]["init_args"])
    main = runpy.run_path(str(root / "examples" / "train_cli.py"))["main"]
    cli = main(["fit", "--config", str(root / "configs" / "tempbalance.yaml"), "--trainer.max_epochs=1",
                f"--trainer.logger.init_args.save_dir={tmp_path}", f"--trainer.default_root_dir={tmp_path}",
                "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                "--trainer.callbacks.init_args.every_n_epochs=1"])
    balancer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "TempBalance")
    # train start (the monitor's baseline may still be in its background worker) + the epoch end
    # if it brought a new snapshot
    assert 1 <= len(balancer.history) <= 2 and balancer.stats["failures"] == 0
    assert all(r.source == "hill_median" or r.source.startswith("monitor:hill_median@") for r in balancer.history)
    assert balancer.group_layers() == ["encoder.0", "encoder.2", "head"]


def test_example_prints_its_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "balancing.py"))
    figure = tmp_path / "balancing.png"
    table = example["main"](["--seeds", "2", "--epochs", "1", "--tasks", "teacher-student", "--plot", str(figure)])
    out = capsys.readouterr().out
    assert "test acc (mean +- std)" in out and "6 runs, 1 epochs each" in out
    assert [(t["task"], t["method"], t["n"]) for t in table] == [
        ("teacher-student", m, 2) for m in ("baseline", "TempBalance", "AlphaDecay")]
    assert all(0.0 <= t["acc_mean"] <= 1.0 and math.isfinite(t["alpha_mean"]) for t in table)
    assert figure.stat().st_size > 10_000


def test_conv_kernels_pool_like_tempbalance_and_norms_follow():
    """Conv ESD = TempBalance's: flatten kernel positions, scale by sqrt(1/2), pool the slices' eigenvalues."""
    from ww_monitor.analysis.results import LayerResult
    from ww_monitor.balancing.estimate import monitor_alphas, own_alphas, unit_alphas

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32),
                        nn.Flatten(), nn.Linear(32, 10))
    units = find_units(net)
    assert [(u.name, u.followers) for u in units] == [("0", ["1"]), ("3", ["4"]), ("6", [])]
    assert units[1].num_evals == 16 * 9
    esds = own_alphas(units, "hill_median", 2.0, 50)
    w = net[3].weight.detach().double()
    slices = (w.flatten(start_dim=2) * math.sqrt(0.5)).permute(2, 0, 1)  # 9 x (32 x 16)
    evals = torch.linalg.svdvals(slices).square().flatten().numpy()
    assert esds[1].alpha == pytest.approx(hill_alpha(evals), rel=1e-9) and esds[1].reliable
    assert not esds[0].reliable  # 3 x 9 = 27 eigenvalues < 50
    # a monitor result flagged unreliable is not used, whatever its fit says
    res = LayerResult(name="3", kind="conv2d", N=32, M=16, Q=2.0, num_evals=144, alpha=3.0, fit_ok=True)
    assert monitor_alphas([res], "ww", 2.0, 50)[0].reliable
    res.reliable = False
    assert not monitor_alphas([res], "ww", 2.0, 50)[0].reliable
    alphas, reliable = unit_alphas(units, monitor_alphas([res], "ww", 2.0, 50))
    assert reliable == [False, False, False] and alphas[1] == 3.0
