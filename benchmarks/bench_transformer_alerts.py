"""Is ``alpha_low`` on a transformer's layers a signal of over-training, or noise? Evidence.

    python benchmarks/bench_transformer_alerts.py               # 2 seeds x 2 regimes (~5 min on 2 busy cores)
    python benchmarks/bench_transformer_alerts.py --seeds 1

The LLaMA copy task of ``examples/transformer_copy_task.py`` (6 blocks, 44 matrices) in two
regimes, same model, optimiser and number of steps (320):

* **generalising**: 2048 training sequences, 10 epochs, a snapshot every epoch; solved
  (held-out token accuracy 1.0) and the validation loss still falling at the end;
* **memorising**: 64 training sequences (batches of 16), 80 epochs, a snapshot every 8 epochs;
  the training loss goes to ~0 while held-out sequences are not copied (over-fitting).

For each run and each layer role (attention q/k, attention v/o, MLP gate/up, MLP down,
embedding + head) it prints how many layers the default ``alpha_low`` rule fired on, how many
have a reliable alpha < 2 at the last snapshot and how many of those are below 2 by the rule's
margin (``AlertConfig.alpha_low_sigmas`` standard errors of the fit), and the median alpha and
tail size at the last snapshot. A rule that is a signal of over-training fires
more in the memorising runs than in the generalising ones; one that fires alike in both is noise
for that role. The callback runs blocking (alerts at their snapshot) without figures.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import runpy
import statistics
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from ww_monitor.monitoring.alerts import AlertConfig

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                       "transformer_copy_task.py")
#: The two regimes: keyword arguments of ``train_copy_task`` (320 optimiser steps each).
REGIMES = {
    "generalising": dict(samples=2048, batch_size=64, epochs=10, every_n_epochs=1),
    "memorising": dict(samples=64, batch_size=16, epochs=80, every_n_epochs=8),
}
#: Layer roles by the last part of the name (LLaMA's names).
ROLES = {"q_proj": "attn q/k", "k_proj": "attn q/k", "v_proj": "attn v/o", "o_proj": "attn v/o",
         "gate_proj": "mlp gate/up", "up_proj": "mlp gate/up", "down_proj": "mlp down",
         "embed_tokens": "embed/head", "lm_head": "embed/head"}


def role(name: str) -> str:
    return ROLES.get(name.rsplit(".", 1)[-1], "other")


def run(regime: str, seed: int) -> dict:
    example = runpy.run_path(EXAMPLE)
    out = example["train_copy_task"](None, seed=seed, blocking=True, figures_every_n_snapshots=None,
                                      **REGIMES[regime])
    ww = out["callback"]
    last = ww.history[-1]
    alpha, tail, reliable = last.metric("alpha"), last.metric("num_pl_spikes"), last.metric("reliable")
    per_role: dict = defaultdict(lambda: {"layers": 0, "alpha": [], "tail": [], "below2": 0, "resolved": 0,
                                          "fired": 0})
    k = AlertConfig().alpha_low_sigmas  # the default margin, in standard errors of the fit
    for name in last.layers:
        r = per_role[role(name)]
        r["layers"] += 1
        r["alpha"].append(alpha[name])
        r["tail"].append(tail[name])
        below = alpha[name] < 2.0 and reliable[name] > 0.5
        r["below2"] += int(below)
        r["resolved"] += int(below and alpha[name] + k * (alpha[name] - 1) / math.sqrt(tail[name]) < 2.0)
    for a in ww.alerts_fired:
        if a.rule == "alpha_low":
            per_role[role(a.layer)]["fired"] += 1
    losses = [v for _, v in out["val_losses"]]
    return {"regime": regime, "seed": seed, "val_acc": out["val_acc"], "best_val_loss": min(losses),
            "final_val_loss": losses[-1], "per_role": dict(per_role), "seconds": out["seconds"],
            "rules": Counter(a.rule for a in ww.alerts_fired)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t0 = time.perf_counter()
    runs = [run(regime, seed) for seed in range(args.seeds) for regime in REGIMES]
    print("| regime | seed | held-out acc | val loss best -> last | alerts by rule |")
    print("|---|---|---|---|---|")
    for r in runs:
        rules = ", ".join(f"{k} {v}" for k, v in sorted(r["rules"].items())) or "none"
        print(f"| {r['regime']} | {r['seed']} | {r['val_acc']:.3f} | {r['best_val_loss']:.3f} -> "
              f"{r['final_val_loss']:.3f} | {rules} |")
    print("\nPer layer role, last snapshot: alpha_low alerts fired (whole run) / layers with a reliable alpha < 2 / "
          f"of them below 2 by {AlertConfig().alpha_low_sigmas:g} standard errors / layers; median alpha; "
          "median tail size")
    roles = sorted({k for r in runs for k in r["per_role"]})
    print("| role | " + " | ".join(f"{r['regime']} {r['seed']}" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in roles:
        cells = []
        for r in runs:
            x = r["per_role"].get(name)
            cells.append("-" if x is None else f"{x['fired']}/{x['below2']}/{x['resolved']}/{x['layers']}; "
                         f"{statistics.median(x['alpha']):.2f}; {statistics.median(x['tail']):.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n{len(runs)} runs in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
