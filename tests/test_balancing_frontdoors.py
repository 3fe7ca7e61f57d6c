"""The balancers behind the plain-loop and Hugging Face front doors (one core with the Lightning
callbacks of ``test_balancing.py``, whose model, schedules and helpers these tests reuse).

What each optimizer step really uses is read by a step pre-hook registered after the balancers'
(so it sees the per-layer groups the step runs with) and compared with factor x the schedule,
computed independently on a separate optimizer. The factors are compared with the mapping of the
alphas that were logged, the alphas with the Hill estimate of the weights' SVD.
"""

import math

import numpy as np
import pytest
import torch
from test_balancing import LR, SCHEDULERS, UNITS, factors_at, make_net, reference_schedule
from torch import nn

import ww_monitor
from ww_monitor.balancing import hill_alpha, linear_factors
from ww_monitor.balancing.groups import StepScaler, find_units, layer_plan
from ww_monitor.balancing.loop import AlphaDecay, SpectralBalancer, TempBalance
from ww_monitor.errors import WWMonitorError

STEPS_PER_EPOCH, EPOCHS = 4, 3
STEPS = STEPS_PER_EPOCH * EPOCHS


def batches():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64 * STEPS_PER_EPOCH, 32, generator=g), torch.randint(0, 10, (64 * STEPS_PER_EPOCH,), generator=g)
    return list(zip(x.split(64), y.split(64)))


class Net(nn.Module):
    """``make_net`` under the attribute ``net``, so the layers are named as in the Lightning tests."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x):
        return self.net(x)


class LoopRun:
    """A plain loop with an SGD optimizer and a schedule, resumable at any step."""

    def __init__(self, scheduler="CosineAnnealingLR", weight_decay=0.0):
        torch.manual_seed(0)
        self.model = Net()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=0.9, weight_decay=weight_decay)
        self.scheduler = SCHEDULERS[scheduler](self.optimizer, STEPS)
        self.seen = []  # per step: [(lr, weight_decay) of every group the step uses]

    def probe(self):  # registered after the balancers' hooks: sees what the step uses
        self.optimizer.register_step_pre_hook(
            lambda o, a, k: self.seen.append([(g["lr"], g["weight_decay"]) for g in o.param_groups]))

    def train(self, balancers, start=0, end=STEPS, monitor=None):
        data = batches()
        for step in range(start + 1, end + 1):
            x, y = data[(step - 1) % STEPS_PER_EPOCH]
            nn.functional.cross_entropy(self.model(x), y).backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.scheduler.step()
            if monitor is not None:
                monitor.step(self.model, step)
            for b in balancers:
                b.step(step)
            if step % STEPS_PER_EPOCH == 0:
                for b in balancers:
                    b.epoch_end(step // STEPS_PER_EPOCH)

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class OracleSink:
    """A sink ``fn(metrics, step)``: keeps what was logged, and the Hill alpha of each layer's SVD
    at that moment (the weights the balancer just read)."""

    def __init__(self, model):
        self.model, self.logged, self.oracle = model, {}, {}

    def __call__(self, metrics, step):
        self.logged[step] = dict(metrics)
        with torch.no_grad():
            self.oracle[step] = {n: hill_alpha(torch.linalg.svdvals(m.weight.double()).square().numpy())
                                 for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}


def check_mapping(rec, low, high):
    """The factors are the linear mapping of the record's alphas (balanced: the 3 middle layers)."""
    assert list(rec.layers) == UNITS and list(rec.balanced) == [False, True, True, True, False]
    expected = np.ones(len(UNITS))
    expected[1:4] = linear_factors(np.array(rec.alphas)[1:4], low, high)
    assert np.allclose(rec.factors, expected, rtol=1e-12)
    assert sorted(rec.factors[1:4]) != [1.0, 1.0, 1.0]


def test_plain_loop_lr_is_factor_times_schedule(tmp_path):
    run = LoopRun()
    sink = OracleSink(run.model)
    tb = TempBalance(every_n_train_steps=6).attach(run.model, run.optimizer, sinks=sink)
    run.probe()
    run.train([tb])
    tb.close()
    # train start, every epoch end (4, 8, 12) and every 6 steps (6; 12 is an epoch end already)
    assert [r.step for r in tb.history] == [0, 4, 6, 8, 12]
    # epoch: epochs done (as Lightning's records: an epoch-end update says 1 after the first epoch)
    assert [r.epoch for r in tb.history] == [0, 1, 1, 2, 2]
    assert tb.group_layers() == UNITS
    ref = reference_schedule("CosineAnnealingLR", STEPS)
    assert len(run.seen) == STEPS
    for k, groups in enumerate(run.seen):
        factors = factors_at(tb.history, k)
        assert [lr for lr, _ in groups] == pytest.approx([factors[n] * ref[k] for n in UNITS], rel=1e-12, abs=1e-15)
    # outside the step the optimizer is the user's: one group, the plain schedule
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([ref[STEPS]], rel=1e-12)
    for rec in tb.history:
        check_mapping(rec, 0.5, 1.5)
        logged = sink.logged[rec.step]
        alphas = [logged[f"ww/balance_alpha/{n}"] for n in UNITS[1:4]]
        assert [logged[f"ww/balance/{n}"] for n in UNITS[1:4]] == pytest.approx(
            linear_factors(alphas, 0.5, 1.5).tolist(), rel=1e-12)  # the factors are the mapping of what was logged
        assert rec.alphas == pytest.approx([sink.oracle[rec.step][n] for n in UNITS], rel=1e-6)
    # after close the hooks are gone: the next step uses the plain schedule in the user's group
    lr_now = run.optimizer.param_groups[0]["lr"]
    run.train([], start=STEPS, end=STEPS + 1)
    assert [lr for lr, _ in run.seen[-1]] == [lr_now]


def test_plain_loop_alphadecay_scales_weight_decay_only():
    run = LoopRun(scheduler="StepLR", weight_decay=0.1)
    ad = AlphaDecay(every_n_train_steps=3).attach(run.model, [run.optimizer])
    run.probe()
    run.train([ad])
    assert [r.step for r in ad.history] == [0, 3, 6, 9, 12]
    ref = reference_schedule("StepLR", STEPS)
    for k, groups in enumerate(run.seen):
        factors = factors_at(ad.history, k)
        assert [lr for lr, _ in groups] == pytest.approx([ref[k]] * len(UNITS), rel=1e-12)
        assert [wd for _, wd in groups] == pytest.approx([0.1 * factors[n] for n in UNITS], rel=1e-12)
    for rec in ad.history:
        check_mapping(rec, 0.666, 3.0)


def test_plain_loop_resume_restores_factors(tmp_path):
    """6 steps, save, a new process's objects resume for 6 more == 12 steps straight."""
    straight = LoopRun()
    tb_a = TempBalance(every_n_train_steps=6).attach(straight.model, straight.optimizer)
    straight.probe()
    straight.train([tb_a])

    half = LoopRun()
    tb_half = TempBalance(every_n_train_steps=6).attach(half.model, half.optimizer)
    half.train([tb_half], end=6)
    path = tmp_path / "ckpt.pt"
    torch.save({**half.state(), "balancer": tb_half.state_dict()}, path)

    saved = torch.load(path, weights_only=True)
    resumed = LoopRun()
    resumed.load(saved)
    tb_b = TempBalance(every_n_train_steps=6)
    tb_b.load_state_dict(saved["balancer"])
    import ww_monitor.balancing.core as core

    calls = []
    real = core.own_alphas
    core.own_alphas = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        tb_b.attach(resumed.model, resumed.optimizer)  # no recomputation at attach: the state has the factors
        assert calls == [] and tb_b.factors == tb_half.factors and tb_b.factors
        resumed.probe()
        resumed.train([tb_b], start=6)
    finally:
        core.own_alphas = real
    assert len(calls) == 2  # steps 8 (epoch 2) and 12
    assert [r.step for r in tb_b.history] == [r.step for r in tb_a.history] == [0, 4, 6, 8, 12]
    assert tb_b.history[2].factors == tb_half.history[2].factors
    assert flat(resumed.seen) == pytest.approx(flat(straight.seen[6:]), rel=1e-12)
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)


def test_plain_loop_reuses_the_monitors_analysis(monkeypatch):
    import ww_monitor.balancing.core as core

    def never(*args, **kwargs):
        raise AssertionError("alpha computed twice")

    monkeypatch.setattr(core, "own_alphas", never)
    run = LoopRun(weight_decay=1e-3)
    monitor = ww_monitor.Monitor(lambda metrics, step: None, every_n_steps=4, blocking=True,
                                 figures_every_n_snapshots=None, alerts=False)
    logged = []
    monitor.step(run.model, 0)  # the baseline, shared with the balancers' train start
    tb = TempBalance(estimator="ww", every_n_epochs=None, every_n_train_steps=4)
    ad = AlphaDecay(every_n_train_steps=None, every_n_epochs=1)  # hill_median from the monitor's eigenvalues
    tb.attach(run.model, run.optimizer, monitor=monitor, sinks=lambda m, s: logged.append(s))
    ad.attach(run.model, run.optimizer, monitor=monitor)
    run.probe()
    run.train([tb, ad], monitor=monitor)
    monitor.close(run.model, STEPS)
    assert [r.source for r in tb.history] == [f"monitor:ww@{s}" for s in (0, 4, 8, 12)]
    assert [r.source for r in ad.history] == [f"monitor:hill_median@{s}" for s in (0, 4, 8, 12)]
    assert logged == [0, 4, 8, 12]
    for rec in tb.history:
        ww_alpha = next(s for s in monitor.history if s.step == rec.step).metric("alpha")
        assert all(a == ww_alpha[n] for n, a, b in zip(rec.layers, rec.alphas, rec.balanced) if b)
        assert any(rec.balanced)
    # both balancers act in the same step (nested groups): lr x TempBalance's, weight decay x AlphaDecay's
    ref = reference_schedule("CosineAnnealingLR", STEPS)
    for k, groups in enumerate(run.seen):
        lr_f, wd_f = factors_at(tb.history, k), factors_at(ad.history, k)
        assert flat([groups]) == pytest.approx(flat([[(lr_f[n] * ref[k], 1e-3 * wd_f[n]) for n in UNITS]]), rel=1e-12)
    assert len(run.optimizer.param_groups) == 1


def test_nested_scalers_unwind_even_after_a_failed_step():
    """Two balancers with different selections on one optimizer with two groups; a step that raises
    leaves the per-layer groups in place only until the next step."""
    torch.manual_seed(0)
    net = Net()
    decay = [p for p in net.parameters() if p.ndim == 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 0.1},
                           {"params": [p for p in net.parameters() if p.ndim < 2], "weight_decay": 0.0}], lr=LR)
    user_groups = list(opt.param_groups)
    lr_units = find_units(net)
    wd_units = find_units(net, include=r"^net\.(2|5)$", follow_norms=False)
    lr_f, wd_f = {"net.2": 2.0, "net.7": 0.5}, {"net.5": 3.0}
    lr_scaler = StepScaler(opt, lr_units, "lr", lambda: lr_f)
    wd_scaler = StepScaler(opt, wd_units, "weight_decay", lambda: wd_f)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(
        [({id(p) for p in g["params"]}, g["lr"], g["weight_decay"]) for g in o.param_groups]))
    owner = {id(p): u.name for u in lr_units for p in u.params}
    net(torch.randn(8, 32)).sum().backward()
    opt.step()
    assert opt.param_groups == user_groups and all(a is b for a, b in zip(opt.param_groups, user_groups))
    for params, lr, wd in seen[0]:
        (layer,) = {owner[i] for i in params}  # every group the step used is one layer's
        decays = {i for i in params} <= {id(p) for p in decay}
        assert lr == LR * lr_f.get(layer, 1.0)
        assert wd == (0.1 * wd_f.get(layer, 1.0) if decays else 0.0)
    # a failing step (a closure that raises) leaves the groups split; the next step unwinds first
    with pytest.raises(RuntimeError):
        opt.step(closure=lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert len(opt.param_groups) > 2
    opt.step()
    assert all(a is b for a, b in zip(opt.param_groups, user_groups)) and len(opt.param_groups) == 2
    assert seen[-1] == seen[0]
    lr_scaler.remove()
    wd_scaler.remove()
    opt.step()
    assert len(seen[-1]) == 2


def test_plain_loop_arguments_and_misuse():
    with pytest.raises(WWMonitorError, match=r"TempBalance: unknown argument `every_n_steps`; did you mean "
                                             r"`every_n_train_steps`"):
        TempBalance(every_n_steps=5)
    with pytest.raises(WWMonitorError, match="SpectralBalancer: `scale`"):
        SpectralBalancer(scale="momentum")
    tb = TempBalance()
    with pytest.raises(WWMonitorError, match=r"attach\(model, optimizer\) before step"):
        tb.step(1)
    run = LoopRun()
    with pytest.raises(WWMonitorError, match="LBFGS"):
        tb.attach(run.model, torch.optim.LBFGS(run.model.parameters()))
    with pytest.raises(WWMonitorError, match=r"`monitor` must be a ww_monitor.Monitor"):
        tb.attach(run.model, run.optimizer, monitor=object())
    tb.attach(run.model, run.optimizer)
    tb.step(1)
    with pytest.warns(RuntimeWarning, match=r"epoch_end\(\) was never called"):
        tb.close()


def test_layers_are_named_as_the_monitor_names_them():
    """Wrappers (Fabric's ``_forward_module``, DDP's ``module``) are not part of the names, so a
    monitor's results match; a monitor watching none of the balanced layers is not used silently."""
    wrapper = nn.Module()
    wrapper._forward_module = Net()
    assert [u.name for u in find_units(wrapper)] == UNITS
    run = LoopRun()
    monitor = ww_monitor.Monitor(lambda metrics, step: None, every_n_steps=4, blocking=True,
                                 figures_every_n_snapshots=None, alerts=False, include=r"^net\.9$")
    monitor.step(run.model, 0)
    tb = TempBalance(include=r"^net\.[0-7]$")
    with pytest.warns(RuntimeWarning, match="the monitor's analysis has none of the balanced layers"):
        tb.attach(run.model, run.optimizer, monitor=monitor)
    monitor.close()
    assert tb.history[0].source == "hill_median" and tb.history[0].layers == tuple(UNITS[:4])


def test_plain_loop_example_balances(tmp_path, capsys):
    import json
    import re
    import runpy
    from pathlib import Path

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"))
    example["main"](["--logdir", str(tmp_path / "tb"), "--steps", "12", "--every", "4", "--on-lag", "wait",
                     "--balance", "tempbalance"])
    out = capsys.readouterr().out
    # (which monitor snapshots exist by each update depends on the machine's load: the steps are read back)
    steps = json.loads(re.search(r"TempBalance: updates at steps (\[[0-9, ]*\])", out).group(1))
    assert steps[0] == 0 and "factor 1.500" in out and "factor 0.500" in out
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("ww/balance/4")] == steps  # the monitor's writer has the factors


# ---------------------------------------------------------------------------- Hugging Face Trainer
transformers = pytest.importorskip("transformers")

from test_huggingface import Synthetic, read_run, tiny_bert  # noqa: E402

from ww_monitor.huggingface import AlphaDecay as HFAlphaDecay  # noqa: E402
from ww_monitor.huggingface import TempBalance as HFTempBalance  # noqa: E402
from ww_monitor.huggingface import WeightWatcherCallback  # noqa: E402

HF_STEPS, HF_WARMUP, HF_LR, HF_WD = 24, 4, 1e-3, 0.01


class StepProbe(transformers.TrainerCallback):
    """After the balancers: records, at every optimizer step, the lr and weight decay of every group
    the step uses, read by a pre-hook on the torch optimizer inside accelerate's wrapper."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        optimizer.optimizer.register_step_pre_hook(lambda o, a, k: self.seen.append(
            (state.global_step, [(g["lr"], g["weight_decay"]) for g in o.param_groups])))


def hf_trainer(out, callbacks, report_to="none"):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=HF_STEPS, per_device_train_batch_size=8, learning_rate=HF_LR,
        warmup_steps=HF_WARMUP, weight_decay=HF_WD, save_steps=12, logging_steps=1000, report_to=report_to,
        use_cpu=True, disable_tqdm=True, seed=0)
    return transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Synthetic(), callbacks=callbacks)


def hf_schedule():
    """The Trainer's schedule (linear with warm-up) on an unrelated one-parameter optimizer."""
    return reference_schedule(lambda opt, n: transformers.get_linear_schedule_with_warmup(opt, HF_WARMUP, n),
                              HF_STEPS, lr=HF_LR)


def check_hf_steps(probe, tb, ad, trainer, first_step=0):
    """Every step from ``first_step``: lr = TempBalance's factor x schedule, weight decay =
    AlphaDecay's factor x the Trainer's (0.01 in its decay group, 0 in the other)."""
    ref = hf_schedule()
    layers = tb.group_layers()
    assert layers == ad.group_layers()  # the same selection: AlphaDecay's groups split nothing further
    decay_groups = decay_flags(trainer)
    assert any(decay_groups) and not all(decay_groups)
    assert [s for s, _ in probe.seen] == list(range(first_step, HF_STEPS))
    for step, groups in probe.seen:
        lr_f, wd_f = factors_at(tb.history, step), factors_at(ad.history, step)
        assert [lr for lr, _ in groups] == pytest.approx([lr_f.get(n, 1.0) * ref[step] for n in layers],
                                                         rel=1e-12, abs=1e-18)
        assert [wd for _, wd in groups] == pytest.approx(
            [HF_WD * wd_f.get(n, 1.0) if d else 0.0 for n, d in zip(layers, decay_groups)], rel=1e-12)


def decay_flags(trainer):
    """For every group a step uses: whether it comes from the Trainer's weight-decay group (its first)."""
    units = find_units(trainer.model)
    owner = {id(p): u.name for u in units for p in u.params}
    return [gi == 0 for gi, _, _ in layer_plan(trainer.optimizer.param_groups, owner,
                                                {u.name: i for i, u in enumerate(units)})]


def flat(seen):
    return [float(v) for groups in seen for pair in groups for v in pair]


def test_huggingface_trainer_lr_and_weight_decay_every_step_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    tb = HFTempBalance(every_n_epochs=None, every_n_train_steps=6)
    ad = HFAlphaDecay(every_n_train_steps=4)
    probe = StepProbe()
    trainer = hf_trainer(tmp_path / "out", [tb, ad, probe], report_to="tensorboard")
    trainer.train()
    assert [r.step for r in tb.history] == [0, 6, 12, 18, 24]
    assert [r.step for r in ad.history] == [0, 4, 8, 12, 16, 20, 24]
    # the Trainer's optimizer and scheduler are as it made them: two groups, the plain schedule
    assert len(trainer.optimizer.param_groups) == 2 and len(trainer.lr_scheduler.base_lrs) == 2
    layers = next(r.layers for r in tb.history)
    assert layers[0].endswith("attention.self.query") and layers[-1] == "classifier"
    for rec, (low, high) in [(r, (0.5, 1.5)) for r in tb.history] + [(r, (0.666, 3.0)) for r in ad.history]:
        balanced = [i for i, b in enumerate(rec.balanced) if b]
        assert len(balanced) >= 5 and 0 not in balanced and len(rec.layers) - 1 not in balanced
        assert np.allclose(np.array(rec.factors)[balanced],
                           linear_factors(np.array(rec.alphas)[balanced], low, high), rtol=1e-12)
        assert all(f == 1.0 for i, f in enumerate(rec.factors) if i not in balanced)
    check_hf_steps(probe, tb, ad, trainer)

    # logged through the Trainer's TensorBoard integration at the update steps; the factors are the
    # mapping of the logged alphas (float32 in the event file)
    acc = read_run(tmp_path / "tb")
    for balancer, tag, (low, high) in ((tb, "ww/balance", (0.5, 1.5)), (ad, "ww/balance_wd", (0.666, 3.0))):
        rec = balancer.history[-1]
        balanced = [n for n, b in zip(rec.layers, rec.balanced) if b]
        for n in rec.layers:
            assert [e.step for e in acc.Scalars(f"train/{tag}/{n}")] == [r.step for r in balancer.history]
        for k, rec in enumerate(balancer.history):
            alphas = [acc.Scalars(f"train/{tag}_alpha/{n}")[k].value for n in balanced]
            factors = [acc.Scalars(f"train/{tag}/{n}")[k].value for n in balanced]
            assert factors == pytest.approx(linear_factors(alphas, low, high).tolist(), rel=1e-5)
            assert factors == pytest.approx([rec.factor_map()[n] for n in balanced], rel=1e-6)

    # resume from the checkpoint at step 12: the factors come back, the steps after it use the same
    # lrs and weight decays as the straight run
    import ww_monitor.balancing.core as core

    calls = []
    real = core.own_alphas
    monkeypatch.setattr(core, "own_alphas", lambda *a, **k: calls.append(1) or real(*a, **k))
    tb2, ad2, probe2 = HFTempBalance(every_n_epochs=None, every_n_train_steps=6), HFAlphaDecay(every_n_train_steps=4), \
        StepProbe()
    trainer2 = hf_trainer(tmp_path / "out", [tb2, ad2, probe2])
    trainer2.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-12"))
    assert len(calls) == 2 + 3  # TempBalance at 18, 24; AlphaDecay at 16, 20, 24: none at the resume
    assert [r.step for r in tb2.history] == [0, 6, 12, 18, 24]
    assert [r.factors for r in tb2.history][:3] == [r.factors for r in tb.history][:3]
    assert [r.factors for r in ad2.history][:4] == [r.factors for r in ad.history][:4]
    check_hf_steps(probe2, tb2, ad2, trainer2, first_step=12)
    assert [s for s, _ in probe2.seen] == [s for s, _ in probe.seen[12:]]
    assert flat(g for _, g in probe2.seen) == pytest.approx(flat(g for _, g in probe.seen[12:]), rel=1e-9)


def test_huggingface_reuses_the_monitors_analysis(tmp_path, monkeypatch):
    import ww_monitor.balancing.core as core

    def never(*args, **kwargs):
        raise AssertionError("alpha computed twice")

    monkeypatch.setattr(core, "own_alphas", never)
    ww = WeightWatcherCallback(every_n_steps=12, every_n_epochs=None, blocking=True, figures_every_n_snapshots=None,
                               tensorboard=False, alerts=False)
    tb = HFTempBalance(estimator="ww", every_n_epochs=None, every_n_train_steps=12)
    probe = StepProbe()
    with pytest.warns(RuntimeWarning, match="no logger"):  # the monitor has nowhere to write here
        trainer = hf_trainer(tmp_path / "out", [ww, tb, probe])
        trainer.train()
    assert [r.source for r in tb.history] == [f"monitor:ww@{s}" for s in (0, 12, 24)]
    for rec in tb.history:
        ww_alpha = next(s for s in ww.history if s.step == rec.step).metric("alpha")
        used = [(n, a) for n, a, b in zip(rec.layers, rec.alphas, rec.balanced) if b]
        assert len(used) >= 3 and all(a == ww_alpha[n] for n, a in used)  # the layers the monitor's fit trusts
    ref = hf_schedule()
    for step, groups in probe.seen:
        factors = factors_at(tb.history, step)
        assert [lr for lr, _ in groups] == pytest.approx([factors.get(n, 1.0) * ref[step] for n in tb.group_layers()],
                                                         rel=1e-12, abs=1e-18)
    assert math.isfinite(tb.stats["seconds"]) and tb.stats["failures"] == 0


def test_huggingface_example_balances(tmp_path, capsys):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "huggingface_trainer.py"))
    example["main"](["--out", str(tmp_path / "out"), "--steps", "4", "--every", "2", "--on-lag", "wait",
                     "--balance", "alphadecay"])
    assert "AlphaDecay: updates at steps [0, " in capsys.readouterr().out
    (run,) = [d for d in (tmp_path / "out" / "runs").iterdir() if d.name != "ww_monitor"]
    tags = read_run(run).Tags()["scalars"]
    assert "train/ww/balance_wd/bert.encoder.layer.0.intermediate.dense" in tags
    assert list((tmp_path / "out" / "checkpoint-4").glob("ww_monitor_balance_weight_decay.pt"))
