"""False alarms on healthy runs and detection latency on faulty runs, at the default alert config.

    python benchmarks/bench_signals.py              # 4 families x 3 seeds + 5 faults (~5 min on 2 cores)
    python benchmarks/bench_signals.py --seeds 1    # one seed per family

Real Lightning training on CPU (models, data and faults: ``signal_models.py``). The callback
runs with its defaults (every epoch, default :class:`~ww_monitor.monitoring.alerts.AlertConfig`) except
``blocking=True`` (each snapshot's alerts at that snapshot, so latencies are exact and do not
depend on machine load) and no figures.

Healthy runs: 4 families (MLP and CNN on digits, LSTM on a sequence task, embedding +
transformer encoder on a token task) x ``--seeds``, hyper-parameters that train well. A run
passes when no rule fires except the alpha band (alpha_low / alpha_high), and a band alert
only for a layer that stays outside: it fires once per layer (no flapping) and does not
resolve within ``FLAP_SNAPSHOTS`` snapshots of firing.

Faulty runs, each with a known onset snapshot (the first snapshot that can see the fault):

* strong weight decay on the bottleneck of the rank-collapse example -> ``rank_collapse``;
* NaN written into a layer -> ``non_finite``;
* learning rate x1000 -> ``diverging``;
* half of a layer's units dead (rows zeroed and kept at zero) -> ``rank_collapse``;
* heavy over-fitting (32 digits, batches of 4, 200 epochs, no regularisation; the onset is the
  epoch of the lowest validation loss, snapshots every 5 epochs) -> ``alpha_low``.

A fault is detected when its rule fires (on the faulty layer where there is one) within
``MAX_LATENCY`` snapshots of the onset (latency = detection snapshot - onset snapshot; negative
= before the validation loss turned).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytorch_lightning as pl
import signal_models as SM
import torch

from ww_monitor import WeightWatcherCallback

#: Alert rules a healthy run may raise: the alpha band the product promises.
BAND_RULES = ("alpha_low", "alpha_high")
#: A band alert that resolves within this many snapshots of firing counts as flapping.
FLAP_SNAPSHOTS = 2
#: Detection target: the right rule within this many snapshots of the onset.
MAX_LATENCY = 2


@dataclass
class Run:
    label: str
    val_acc: float
    steps: list[int]
    epochs_of: list[int]
    alerts: list = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def index(self, step: int) -> int:
        return self.steps.index(step)


class ValLoss(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.losses.append(float(trainer.callback_metrics["val/loss"]))


def train(label, module, train_loader, val_loader, epochs, faults=(), every_n_epochs=1) -> Run:
    fired = []
    ww = WeightWatcherCallback(every_n_epochs=every_n_epochs, blocking=True, figures_every_n_snapshots=None,
                               on_alert=fired.append)
    val = ValLoss()
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # alerts are collected through on_alert; keep the output a table
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                             callbacks=[ww, val, *faults],  # faults after ww: the snapshot at the onset is clean
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(module, train_loader, val_loader)
    acc = trainer.callback_metrics.get("val/acc")
    return Run(label, float(acc) if acc is not None else float("nan"), ww.history.steps,
               [r.epoch for r in ww.history], fired, val.losses, time.perf_counter() - t0)


# --------------------------------------------------------------------------- healthy
def judge_healthy(run: Run) -> tuple[bool, str]:
    """(passed, why not) by the rules in the module docstring."""
    problems = []
    raised = [a for a in run.alerts if not a.resolved]
    for a in raised:
        if a.rule not in BAND_RULES:
            problems.append(f"{a.rule} on {a.layer}")
    per_layer = Counter((a.rule, a.layer) for a in raised if a.rule in BAND_RULES)
    problems += [f"{r} on {l} fired {n}x" for (r, l), n in per_layer.items() if n > 1]
    for a in run.alerts:
        if a.resolved and a.rule in BAND_RULES:
            start = max(x.step for x in raised if (x.rule, x.layer) == (a.rule, a.layer) and x.step <= a.step)
            if run.index(a.step) - run.index(start) <= FLAP_SNAPSHOTS:
                problems.append(f"{a.rule} on {a.layer} resolved {run.index(a.step) - run.index(start)} snapshot(s) "
                                "after firing")
    return not problems, "; ".join(problems)


# --------------------------------------------------------------------------- faults
@dataclass
class FaultCase:
    name: str
    rule: str
    layer: str | None
    build: object  # () -> (run, onset snapshot index)


ONSET_EPOCH = 3  # injected at the end of epoch 2; the snapshot at the end of epoch 3 is the first to see it


def _injected(label, build, fault, epochs=6):
    module, tr, va = build()
    run = train(label, module, tr, va, epochs, faults=[fault])
    onset = next(i for i, e in enumerate(run.epochs_of) if e >= ONSET_EPOCH + 1)
    return run, onset


def _mlp():
    model, tr, va, _ = SM.family("mlp", 0)
    return model, tr, va


def _overfit():
    module, tr, va = SM.overfit(0)
    run = train("over-fitting", module, tr, va, epochs=200, every_n_epochs=5)
    best_epoch = min(range(len(run.val_losses)), key=run.val_losses.__getitem__)
    onset = next(i for i, e in enumerate(run.epochs_of) if e >= best_epoch + 1)
    return run, onset


FAULTS = [
    FaultCase("strong weight decay (bottleneck net.2)", "rank_collapse", "net.2",
              lambda: _injected("weight decay", lambda: SM.bottleneck(0), SM.StrongWeightDecay(ONSET_EPOCH, "net.2"))),
    FaultCase("NaN written into net.2", "non_finite", "net.2",
              lambda: _injected("nan", _mlp, SM.NonFinite(ONSET_EPOCH, "net.2"))),
    FaultCase("learning rate x1000", "diverging", None,
              lambda: _injected("lr", _mlp, SM.DivergingLR(ONSET_EPOCH, 1000.0))),
    FaultCase("half of net.2's units dead", "rank_collapse", "net.2",
              lambda: _injected("dead", _mlp, SM.DeadUnits(ONSET_EPOCH, "net.2"))),
    FaultCase("heavy over-fitting (32 samples, 200 epochs)", "alpha_low", None, _overfit),
]


def detect(run: Run, case: FaultCase, onset: int) -> int | None:
    """Latency in snapshots of the first alert of the right rule (on the right layer), or None."""
    for a in run.alerts:
        if not a.resolved and a.rule == case.rule and (case.layer is None or a.layer == case.layer):
            return run.index(a.step) - onset
    return None


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--families", default=",".join(SM.FAMILIES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t_start = time.perf_counter()

    print("## Healthy runs (default alert config)\n")
    print("| family | seed | val acc | snapshots | alerts by rule | verdict |")
    print("|---|---|---|---|---|---|")
    healthy_ok = 0
    families = [f for f in args.families.split(",") if f]
    for fam in families:
        for seed in range(args.seeds):
            pl.seed_everything(seed, verbose=False)
            module, tr, va, epochs = SM.family(fam, seed)
            run = train(f"{fam}/{seed}", module, tr, va, epochs)
            ok, why = judge_healthy(run)
            healthy_ok += ok
            counts = Counter(a.rule for a in run.alerts if not a.resolved)
            rules = ", ".join(f"{r} {n}" for r, n in sorted(counts.items())) or "none"
            where = sorted({f"{a.layer} {a.value:.2f}" if a.rule in BAND_RULES else a.layer
                            for a in run.alerts if not a.resolved})
            rules += f" ({', '.join(where)})" if where else ""
            verdict = "ok" if ok else f"FALSE ALARM: {why}"
            print(f"| {fam} | {seed} | {run.val_acc:.3f} | {len(run.steps)} | {rules} | {verdict} |", flush=True)
    n_healthy = len(families) * args.seeds

    print("\n## Faulty runs (default alert config)\n")
    print("| fault | expected rule | onset snapshot | detected at | latency (snapshots) | other alerts | verdict |")
    print("|---|---|---|---|---|---|---|")
    faults_ok = 0
    for case in FAULTS:
        pl.seed_everything(0, verbose=False)
        run, onset = case.build()
        latency = detect(run, case, onset)
        ok = latency is not None and latency <= MAX_LATENCY
        faults_ok += ok
        others = Counter(a.rule for a in run.alerts if not a.resolved and a.rule != case.rule)
        other = ", ".join(f"{r} {n}" for r, n in sorted(others.items())) or "none"
        where = f"{case.rule} on {case.layer}" if case.layer else case.rule
        at = "-" if latency is None else str(onset + latency)
        print(f"| {case.name} | {where} | {onset} | {at} | {'-' if latency is None else latency} | {other} "
              f"| {'ok' if ok else 'MISSED'} |", flush=True)

    total = time.perf_counter() - t_start
    print(f"\nno false alarm on healthy runs: {healthy_ok}/{n_healthy} "
          f"{'PASS' if healthy_ok == n_healthy else 'FAIL'}; faults detected by the right rule within "
          f"{MAX_LATENCY} snapshots: {faults_ok}/{len(FAULTS)} {'PASS' if faults_ok == len(FAULTS) else 'FAIL'}; "
          f"{total:.0f} s")
    return 0 if healthy_ok == n_healthy and faults_ok == len(FAULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
