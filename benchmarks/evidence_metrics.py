"""Ground truths, baselines, lead times and rank correlations of ``bench_evidence.py``.

Pure functions of a run's logged series (the record :func:`evidence_cases.train` returns); no
ww_monitor import. Steps are optimizer steps of the monitored run (for the forgetting case,
of its second stage). A probe at step ``s`` saw the weights after ``s`` steps; so did the
monitor's snapshot at ``s``.

**Lead time** of a detector = ground-truth step - the detector's step: positive = it spoke
before the run went wrong; negative = after. "vs EarlyStopping" = EarlyStopping's stop step -
the alert step (positive: the alert came first).
"""

from __future__ import annotations

import math
import statistics

import numpy as np

#: lr_too_high: the run diverged at the first step whose training loss is non-finite or more
#: than this many times the loss of the first step.
LOSS_BLOWUP_FACTOR = 10.0
#: weight_decay: a layer collapsed when more than this fraction of its singular values are lost
#: (below ``evidence_tasks.LOST_RTOL`` of its largest singular value at initialisation).
COLLAPSED_FRACTION = 0.5
#: dead_relu: a ReLU layer is dead when at least this fraction of its units is never positive
#: on the probe batch.
DEAD_FRACTION = 0.5
#: init_*: the signal through the hidden stack (the input-dependent spread of the last ReLU
#: layer's output / that of the input features, ``evidence_tasks.signal``) is off by more than this factor from the same network at PyTorch's default
#: initialisation (same seed).
ACT_SCALE_FACTOR = 100.0
#: forgetting: the first task is forgotten once its accuracy is below this fraction of its
#: accuracy at the start of the second stage.
FORGET_FRACTION = 0.5
#: Lightning EarlyStopping's default patience, the baseline's setting.
ES_PATIENCE = 3


def _epoch_probes(rec: dict) -> list[dict]:
    return [p for p in rec["probes"] if p["epoch"] >= 0]


def _first(probes, cond) -> int | None:
    return next((p["step"] for p in probes if cond(p)), None)


# --------------------------------------------------------------------------- ground truths
def gt_best_val_acc(rec: dict) -> int | None:
    """Step of the epoch with the highest validation accuracy (the first, on ties)."""
    ps = [p for p in _epoch_probes(rec) if math.isfinite(p["val_acc"])]
    return max(ps, key=lambda p: (p["val_acc"], -p["step"]))["step"] if ps else None


def gt_best_val_loss(rec: dict) -> int | None:
    """Step of the epoch with the lowest validation loss (the first, on ties)."""
    ps = [p for p in _epoch_probes(rec) if math.isfinite(p["val_loss"])]
    return min(ps, key=lambda p: (p["val_loss"], p["step"]))["step"] if ps else None


def gt_loss_blowup(rec: dict) -> int | None:
    """First step whose training loss is non-finite or > LOSS_BLOWUP_FACTOR x the first step's."""
    if not rec["loss"]:
        return None
    limit = LOSS_BLOWUP_FACTOR * rec["loss"][0][1]
    return next((s for s, v in rec["loss"] if not math.isfinite(v) or v > limit), None)


def gt_rank_collapse(rec: dict) -> int | None:
    """First probe at which some weight matrix lost more than COLLAPSED_FRACTION of its directions."""
    return _first(rec["probes"], lambda p: any(
        lost > COLLAPSED_FRACTION * p["min_dim"][n] for n, lost in p["lost"].items()))


def gt_dead_units(rec: dict) -> int | None:
    """First probe at which some ReLU layer has >= DEAD_FRACTION of its units dead."""
    return _first(rec["probes"], lambda p: any(math.isfinite(d) and d >= DEAD_FRACTION for d in p["dead"].values()))


def activation_ratio(probe: dict) -> float:
    return probe["act_std"] / probe["in_std"] if probe["in_std"] > 0 else math.nan


def gt_activation_scale(rec: dict) -> int | None:
    """Step 0 when the signal at initialisation is more than ACT_SCALE_FACTOR x off the same
    network's at PyTorch's default initialisation (the fault is the initialisation itself); else None."""
    ref, r = rec["reference_activation_ratio"], activation_ratio(rec["probes"][0])
    off = not math.isfinite(r) or r < ref / ACT_SCALE_FACTOR or r > ref * ACT_SCALE_FACTOR
    return rec["probes"][0]["step"] if off else None


def gt_forgetting(rec: dict) -> int | None:
    """First probe at which the first task's accuracy is below FORGET_FRACTION of its value at step 0."""
    start = rec["probes"][0]["old_acc"]
    return _first(rec["probes"], lambda p: p["old_acc"] < FORGET_FRACTION * start)


GROUND_TRUTHS = {
    "best_val_acc": gt_best_val_acc, "best_val_loss": gt_best_val_loss, "loss_blowup": gt_loss_blowup,
    "rank_collapse": gt_rank_collapse, "dead_units": gt_dead_units, "activation_scale": gt_activation_scale,
    "forgetting": gt_forgetting,
}
GROUND_TRUTH_RULES = {
    "best_val_acc": "step of the epoch with the highest validation accuracy",
    "best_val_loss": "step of the epoch with the lowest validation loss",
    "loss_blowup": f"first step whose training loss is non-finite or > {LOSS_BLOWUP_FACTOR:g}x the first step's",
    "rank_collapse": f"first probe at which a weight matrix has more than {COLLAPSED_FRACTION:.0%} of its singular "
                     "values below 1e-3 of its largest singular value at initialisation (torch.linalg.svdvals)",
    "dead_units": f"first probe at which a ReLU layer has >= {DEAD_FRACTION:.0%} of its units never positive on "
                  "256 training samples",
    "activation_scale": f"step 0 if, at initialisation, the signal through the hidden stack (spread across 256 "
                        f"training samples of the last ReLU output / of the input) is more than {ACT_SCALE_FACTOR:g}x "
                        "off the same network's at PyTorch's default initialisation",
    "forgetting": f"first probe at which the first task's validation accuracy is below {FORGET_FRACTION:.0%} of "
                  "its value when the fine-tune starts",
}


# --------------------------------------------------------------------------- baselines
def early_stopping_step(rec: dict, patience: int = ES_PATIENCE) -> int | None:
    """Where ``EarlyStopping(monitor="val_loss", patience=patience)`` stops the run: Lightning's
    own decision method (``_evaluate_stopping_criteria``, mode "min", min_delta 0,
    check_finite) fed the logged validation losses epoch by epoch."""
    import torch
    from pytorch_lightning.callbacks import EarlyStopping

    es = EarlyStopping(monitor="val_loss", patience=patience, mode="min")
    for p in _epoch_probes(rec):
        stop, _ = es._evaluate_stopping_criteria(torch.tensor(p["val_loss"]))
        if stop:
            return p["step"]
    return None


def nan_check_step(rec: dict) -> int | None:
    """First step whose training loss is NaN or Inf (``torch.isfinite(loss)`` after each step)."""
    return next((s for s, v in rec["loss"] if not math.isfinite(v)), None)


def lead(reference: int | None, at: int | None) -> int | None:
    return None if reference is None or at is None else reference - at


# --------------------------------------------------------------------------- alerts
def raised(rec: dict) -> list[dict]:
    return [a for a in rec["alerts"] if not a["resolved"]]


def healthy_pairs(healthy_records) -> dict[str, set]:
    """Per architecture, the (rule, layer) pairs any healthy run raised."""
    out: dict[str, set] = {}
    for rec in healthy_records:
        out.setdefault(rec["spec"]["arch"], set()).update((a["rule"], a["layer"]) for a in raised(rec))
    return out


def first_alert(rec: dict, exclude: set = frozenset()) -> dict | None:
    """The earliest raised alert whose (rule, layer) is not in ``exclude`` (order of firing)."""
    return next((a for a in raised(rec) if (a["rule"], a["layer"]) not in exclude), None)


def median(values) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# --------------------------------------------------------------------------- ranking
def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row pair (average ranks for ties; NaN for a constant row)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx, ry = rx - rx.mean(1, keepdims=True), ry - ry.mean(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rx * ry).sum(1) / np.sqrt((rx ** 2).sum(1) * (ry ** 2).sum(1))


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of every row pair: sum sgn(dx) sgn(dy) / sqrt(sum sgn(dx)^2 sum sgn(dy)^2)
    over the pairs i < j (NaN for a constant row)."""
    iu = np.triu_indices(x.shape[1], 1)
    sx = np.sign(x[:, :, None] - x[:, None, :])[:, iu[0], iu[1]]
    sy = np.sign(y[:, :, None] - y[:, None, :])[:, iu[0], iu[1]]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sx * sy).sum(1) / np.sqrt((sx ** 2).sum(1) * (sy ** 2).sum(1))


def rank_correlations(x, y, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman and Kendall (tau-b) correlation of ``x`` with ``y`` with their p-values
    (``scipy.stats.spearmanr`` / ``kendalltau``) and percentile bootstrap confidence intervals:
    ``n_resamples`` seeded resamples of the (x, y) pairs with replacement, the same statistic on
    each (vectorised); resamples on which it is undefined (a constant input, possible with few
    variants) are dropped and counted in ``dropped``."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_resamples, len(x)))
    out = {}
    for name, fn, rows in (("spearman", stats.spearmanr, _spearman_rows), ("kendall", stats.kendalltau, _kendall_rows)):
        res = fn(x, y)
        boot = rows(x[idx], y[idx])
        ok = boot[np.isfinite(boot)]
        tail = 100 * (1 - level) / 2
        ci = [float(np.percentile(ok, tail)), float(np.percentile(ok, 100 - tail))] if len(ok) else [math.nan] * 2
        out[name] = {"r": float(res.statistic), "p": float(res.pvalue), "ci": ci,
                     "dropped": int(n_resamples - len(ok))}
    return out
