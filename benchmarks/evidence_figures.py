"""Figures of ``bench_evidence.py`` (matplotlib's object API, no pyplot state)."""

from __future__ import annotations

import math

import evidence_cases as C
import evidence_ranking as R
import numpy as np

#: Detector markers: (row key of the step, label, colour, line style).
DETECTORS = (("gt_step", "ground truth", "black", "-"), ("alert_step", "first new alert", "tab:red", "--"),
             ("es_step", "EarlyStopping(val_loss)", "tab:blue", ":"),
             ("drift_step", "AlphaDriftEarlyStopping", "tab:green", "-."),
             ("nan_step", "NaN/Inf loss check", "tab:purple", (0, (1, 3))))


def timelines(records: dict, rows: list[dict], path) -> None:
    """One panel per (kind, architecture), its first seed: validation accuracy (and the first
    task's, for forgetting) and mean alpha over epochs, with each detector's step."""
    from matplotlib.figure import Figure

    firsts = {}
    for r in rows:
        firsts.setdefault((r["kind"], r["arch"]), r)
    panels = sorted(firsts.values(), key=lambda r: ([k.name for k in C.FAILURES].index(r["kind"]), r["arch"]))
    cols = 4
    nrows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.2 * cols, 2.9 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax, row in zip(axes, panels):
        rec = records[row["label"]]
        spe = rec["steps_per_epoch"]
        ps = [p for p in rec["probes"] if p["epoch"] >= 0]
        ax.plot([p["step"] / spe for p in ps], [p["val_acc"] for p in ps], color="0.2", lw=1.2, label="val acc")
        if "old_acc" in rec["probes"][0]:
            ax.plot([p["step"] / spe for p in rec["probes"]], [p["old_acc"] for p in rec["probes"]], color="0.6",
                    lw=1.2, label="first task acc")
        ax.set_ylim(-0.02, 1.02)
        ax2 = ax.twinx()
        snaps = [s for s in rec["snapshots"] if s["alpha"] is not None and math.isfinite(s["alpha"])]
        ax2.plot([s["step"] / spe for s in snaps], [s["alpha"] for s in snaps], color="tab:orange", lw=1.0)
        ax2.tick_params(axis="y", colors="tab:orange", labelsize=7)
        marks = dict(row, alert_step=row["first_specific_alert"]["step"] if row["first_specific_alert"] else None)
        for key, label, color, style in DETECTORS:
            if marks.get(key) is not None:
                ax.axvline(marks[key] / spe, color=color, ls=style, lw=1.6, label=label)
        ax.set_title(f"{row['kind']} / {row['arch']} (seed {row['seed']})", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [h for h in axes[0].get_legend_handles_labels()[0]]
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.2", label="val acc (left)"), Line2D([], [], color="0.6", label="first task acc"),
               Line2D([], [], color="tab:orange", label="mean alpha (right)")]
    handles += [Line2D([], [], color=c, ls=s, label=lb) for _, lb, c, s in DETECTORS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=80)


def lead_times(rows: list[dict], path) -> None:
    """Lead time (epochs, ground truth - detector step) of each detector on every failure run."""
    from matplotlib.figure import Figure

    keys = [(r["kind"], r["arch"]) for r in rows]
    groups = list(dict.fromkeys(keys))
    fig = Figure(figsize=(8.5, 0.38 * len(groups) + 1.4))
    ax = fig.subplots()
    series = (("lead_gt", "first new alert", "tab:red", "o", -0.2), ("drift_lead_gt", "AlphaDriftEarlyStopping",
              "tab:green", "s", -0.07), ("es_lead_gt", "EarlyStopping(val_loss)", "tab:blue", "^", 0.07),
              ("nan_lead_gt", "NaN/Inf loss check", "tab:purple", "x", 0.2))
    for key, label, color, marker, dy in series:
        xs, ys = [], []
        for r in rows:
            if r["gt_step"] is not None and r[key] is not None:
                xs.append(r[key] / r["steps_per_epoch"])
                ys.append(groups.index((r["kind"], r["arch"])) + dy)
        ax.scatter(xs, ys, color=color, marker=marker, s=22, label=label)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(groups)), [f"{k} / {a}" for k, a in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("lead time, epochs (> 0: before the ground truth; missing: never fired)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def ranking(rows: list[dict], corr: dict, path) -> None:
    """Each metric (and the final training loss) against test accuracy, one panel each."""
    from matplotlib.figure import Figure

    keys = (*R.METRICS, R.BASELINE)
    fig = Figure(figsize=(12, 6.4))
    axes = fig.subplots(2, 3).ravel()
    acc = [r["test_acc"] for r in rows]
    colour = [math.log2(r["width"]) for r in rows]
    for ax, key in zip(axes, keys):
        ax.scatter([r[key] for r in rows], acc, c=colour, cmap="viridis", edgecolors="k", s=28)
        c = corr[key]["spearman"]
        ax.set_title(f"{key}: Spearman {c['r']:+.2f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}]", fontsize=9)
        ax.set_xlabel(("final training loss (baseline)" if key == R.BASELINE else f"mean {key}"), fontsize=8)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{len(rows)} variants of the digits MLP (colour: log2 width); 95% bootstrap CI", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
