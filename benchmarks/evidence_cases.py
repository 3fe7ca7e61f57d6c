"""Run specifications of ``bench_evidence.py`` and the function that trains one.

A :class:`RunSpec` is one real Lightning training run on CPU. Every failure case is its
architecture's base run with one ingredient changed (:data:`FAILURES`); the healthy corpus varies
width, depth, optimizer, schedule and seed (:func:`healthy_specs`). :func:`train` trains a spec
with ``WeightWatcherCallback`` and ``AlphaDriftEarlyStopping`` at their defaults (see
``bench_evidence.py`` for the two settings changed and why) and the ground-truth
:class:`~evidence_tasks.Probe`, and returns a JSON-ready record.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, replace

import evidence_replay
import evidence_tasks as T
import pytorch_lightning as pl
import torch

ARCHS = ("mlp", "transformer")
ARCH_TITLES = {"mlp": "MLP on digits", "transformer": "transformer on the order task"}

#: The base (healthy) run of each architecture; failures change one thing of it.
BASE = {
    "mlp": dict(width=256, depth=3, optimizer="sgd", lr=0.05, weight_decay=0.0, schedule="cosine", epochs=30,
                batch_size=64),
    "transformer": dict(width=64, depth=2, optimizer="adamw", lr=3e-3, weight_decay=0.01, schedule="cosine",
                        epochs=15, batch_size=64),
}


@dataclass(frozen=True)
class RunSpec:
    arch: str
    seed: int
    width: int
    depth: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    epochs: int
    batch_size: int
    kind: str = "healthy"
    label_noise: float = 0.0
    train_size: int | None = None
    init_scale: float = 1.0
    ramp_to: float = 1.0
    spike: tuple | None = None  # (start step, steps, lr factor)
    pretrain_epochs: int = 0  # > 0: forgetting case; stage 1 on the base task, then the run on a conflicting one
    init_std: float | None = None  # transformer only: N(0, init_std^2) weights (GPT-2: 0.02)

    @property
    def label(self) -> str:
        if self.kind == "healthy":  # the grid varies more than the seed
            init = f"/init-std{self.init_std:g}" if self.init_std is not None else ""
            return (f"healthy/{self.arch}/{self.width}x{self.depth}/{self.optimizer}-{self.schedule}{init}"
                    f"/seed{self.seed}")
        return f"{self.kind}/{self.arch}/seed{self.seed}"


def base_spec(arch: str, seed: int, **changes) -> RunSpec:
    return replace(RunSpec(arch=arch, seed=seed, **BASE[arch]), **changes)


# --------------------------------------------------------------------------- failure corpus
@dataclass(frozen=True)
class FailureKind:
    name: str
    title: str
    truth: str  # name of the ground-truth rule in evidence_metrics.GROUND_TRUTHS
    changes: dict  # arch -> RunSpec changes from the base run (an arch missing: not run, see why_not)
    why_not: str = ""


#: Why a kind is not run on an architecture (shown in the tables).
_LN_INIT = ("not run: the pre-LN transformer normalises the input of every sublayer, so the activation-scale "
            "ground truth cannot see a weight-scale fault (x0.1 trains to 100% validation accuracy, x10 fails "
            "through saturated attention)")
FAILURES = (
    FailureKind("label_noise", "label-noise memorisation (40% of the training labels wrong)", "best_val_acc", {
        "mlp": dict(label_noise=0.4, schedule="constant", epochs=60),
        "transformer": dict(label_noise=0.4, schedule="constant", weight_decay=0.0, epochs=40),
    }),
    FailureKind("lr_too_high", "learning rate too high (linear warm-up to 20x / 100x the base rate)", "loss_blowup", {
        "mlp": dict(schedule="ramp", ramp_to=20.0),
        "transformer": dict(schedule="ramp", ramp_to=100.0),
    }),
    FailureKind("weight_decay", "excessive weight decay (SGD 0.05 / AdamW 20)", "rank_collapse", {
        "mlp": dict(weight_decay=0.05),
        "transformer": dict(weight_decay=20.0),
    }),
    FailureKind("dead_relu", "dead ReLU units after a learning-rate spike in epoch 4 (x20 for 3 steps / x40 for 10)",
                "dead_units", {
                    "mlp": dict(spike=(3 * 23, 3, 20.0)),
                    "transformer": dict(spike=(3 * 32, 10, 40.0)),
                }),
    FailureKind("init_vanishing", "vanishing initialisation (every weight matrix x0.1)", "activation_scale",
                {"mlp": dict(init_scale=0.1)}, why_not=_LN_INIT),
    FailureKind("init_exploding", "exploding initialisation (every weight matrix x10)", "activation_scale",
                {"mlp": dict(init_scale=10.0)}, why_not=_LN_INIT),
    FailureKind("data_starvation", "data starvation (40 training samples, batches of 8)", "best_val_loss", {
        "mlp": dict(train_size=40, batch_size=8, schedule="constant", epochs=80),
        "transformer": dict(train_size=40, batch_size=8, schedule="constant", weight_decay=0.0, epochs=80),
    }),
    FailureKind("forgetting", "catastrophic forgetting: fine-tune on a conflicting task (permuted pixels / "
                "swapped rule)", "forgetting", {
                    "mlp": dict(pretrain_epochs=15, epochs=15),
                    "transformer": dict(pretrain_epochs=8, epochs=10),
                }),
)
KIND_BY_NAME = {k.name: k for k in FAILURES}


def failure_specs(kinds, archs, seeds) -> list[RunSpec]:
    return [base_spec(arch, seed, kind=k.name, **k.changes[arch])
            for k in kinds for arch in archs if arch in k.changes for seed in seeds]


# --------------------------------------------------------------------------- healthy corpus
#: Varied per architecture: (widths, depths); optimizers and schedules are shared.
HEALTHY_SIZES = {"mlp": ((128, 512), (2, 4)), "transformer": ((32, 96), (1, 3))}
HEALTHY_OPTIMIZERS = {"sgd": {"mlp": 0.05, "transformer": 0.03}, "adamw": {"mlp": 1e-3, "transformer": 3e-3}}
HEALTHY_SCHEDULES = ("cosine", "step")


#: GPT-2's initialisation (every weight matrix N(0, 0.02^2)): the healthy transformer runs also
#: use it, since many transformers are initialised this way rather than with PyTorch's defaults.
GPT2_INIT_STD = 0.02


def healthy_specs(archs, seeds, grid_points: int = 16) -> list[RunSpec]:
    """Per architecture: the base run for every seed (the failures' reference; the transformer's
    also with GPT-2's initialisation), then ``grid_points`` of the 2^4 grid width x depth x
    optimizer x schedule, evenly spread over it (2 points: the first and the last, which differ
    in every factor), the seeds cycling."""
    specs = [base_spec(arch, seed) for arch in archs for seed in seeds]
    specs += [base_spec(arch, seed, init_std=GPT2_INIT_STD) for arch in archs if arch == "transformer"
              for seed in seeds]
    for arch in archs:
        widths, depths = HEALTHY_SIZES[arch]
        grid = [(w, d, o, s) for w in widths for d in depths for o in HEALTHY_OPTIMIZERS for s in HEALTHY_SCHEDULES]
        k = min(grid_points, len(grid))
        picks = [round(i * (len(grid) - 1) / (k - 1)) for i in range(k)] if k > 1 else list(range(k))
        for n, i in enumerate(picks):
            w, d, o, s = grid[i]
            specs.append(base_spec(arch, seeds[n % len(seeds)], width=w, depth=d, optimizer=o, schedule=s,
                                   lr=HEALTHY_OPTIMIZERS[o][arch], weight_decay=0.01 if o == "adamw" else 0.0))
    return specs


# --------------------------------------------------------------------------- training
def _net(spec: RunSpec):
    if spec.arch == "mlp":
        return T.mlp(spec.width, spec.depth, spec.init_scale)
    return T.OrderTransformer(spec.width, spec.depth, spec.init_scale, spec.init_std)


def _task(spec: RunSpec, stage2: bool = False):
    if spec.arch == "mlp":
        return T.digits_task(spec.seed, spec.batch_size, spec.train_size, spec.label_noise, permuted=stage2)
    return T.order_task(spec.seed, spec.batch_size, spec.train_size, spec.label_noise, swap=stage2)


def _trainer(epochs: int, callbacks) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                      num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)


def _module(spec: RunSpec, net, steps_per_epoch: int, epochs: int) -> T.TaskModule:
    return T.TaskModule(net, spec.lr, spec.optimizer, spec.weight_decay, spec.schedule,
                        total_steps=steps_per_epoch * epochs, ramp_to=spec.ramp_to, spike=spec.spike)


def _val_loader(val):
    return T._loader(*val, batch_size=T.VAL_BATCH, seed=0, shuffle=False)


def train(spec: RunSpec, monitor_kwargs: dict) -> dict:
    """Train ``spec`` (both stages for the forgetting case) and return its record: the spec,
    the probe's series, every alert, the monitor's per-snapshot summary, AlphaDriftEarlyStopping's
    decision and the wall time. Only stage 2 of the forgetting case is monitored (a fine-tune
    with its own callbacks, as a user would run it); its steps count from 0."""
    from ww_monitor import WeightWatcherCallback

    t0 = time.perf_counter()
    # The activation-scale ground truth's reference: this network at PyTorch's default
    # initialisation (same seed), built before the run's own seeding so it draws nothing from it.
    pl.seed_everything(spec.seed, verbose=False)
    reference = _net(replace(spec, init_scale=1.0, init_std=None))
    pl.seed_everything(spec.seed, verbose=False)
    net = _net(spec)
    old_task = None
    if spec.pretrain_epochs:
        loader, val = _task(spec)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning's hints about the small dataset
            _trainer(spec.pretrain_epochs, []).fit(_module(spec, net, len(loader), spec.pretrain_epochs), loader,
                                                   _val_loader(val))
        old_task = val
    loader, val = _task(spec, stage2=bool(spec.pretrain_epochs))
    probe_x = loader.dataset.tensors[0][: T.PROBE_SAMPLES]
    ref = T.activations(reference, probe_x)
    probe = T.Probe(probe_x, old_task)
    fired = []
    ww = WeightWatcherCallback(on_alert=fired.append, **monitor_kwargs)
    drift = T.shadow_alpha_drift()
    module = _module(spec, net, len(loader), spec.epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # alerts arrive through on_alert; keep the output a table
        _trainer(spec.epochs, [ww, drift, probe]).fit(module, loader, _val_loader(val))
    snapshots = [{"step": r.step, "epoch": r.epoch, **{k: r.summary.get(k) for k in
                  ("alpha", "alpha_weighted", "num_layers", "num_random_like", "num_unreliable")}} for r in ww.history]
    return {
        "label": spec.label, "spec": asdict(spec), "steps_per_epoch": len(loader),
        "loss": probe.loss, "probes": probe.epochs, "reference_activation_ratio": ref["act_std"] / ref["in_std"], "snapshots": snapshots,
        "layer_history": evidence_replay.record_history(ww.history),
        "alerts": [{"rule": a.rule, "layer": a.layer, "step": a.step, "epoch": a.epoch, "value": a.value,
                    "resolved": a.resolved} for a in fired],
        "alpha_drift": {"stopped_step": drift.stopped_step, "reason": drift.stopped_reason,
                        "warmup_end_step": drift.warmup_end_step},
        "seconds": time.perf_counter() - t0, "analysis_seconds": float(ww.stats["analysis_seconds"]),
    }


def spec_from_dict(d: dict) -> RunSpec:
    d = dict(d)
    if d.get("spike") is not None:
        d["spike"] = tuple(d["spike"])
    return RunSpec(**d)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
