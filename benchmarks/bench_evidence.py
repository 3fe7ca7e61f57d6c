"""Evidence: which training failures the monitor catches and how early, how often it cries wolf
on healthy runs, and how well spectral metrics rank models without test data.

    python benchmarks/bench_evidence.py                 # full: 3 seeds, both architectures, 32 variants
                                                        # (10 min on a shared 2-core VM at a load of ~3, 21 at ~5)
    python benchmarks/bench_evidence.py --quick         # CI-sized: 1 seed, a smaller healthy grid, 16 variants
                                                        # (2-3.5 min at a load of 0.4-5)
    python benchmarks/bench_evidence.py --quick --cases label_noise,lr_too_high --archs mlp \\
        --healthy-grid 0 --variants 6                   # the subset tests/test_evidence.py runs

Every run is real Lightning training on CPU (``evidence_cases.py``: an MLP on scikit-learn's
digits and a small pre-LN transformer on a synthetic order task; ``evidence_tasks.py``: data,
models, the ground-truth probe). Results go to ``--out`` (default ``benchmarks/results/evidence``):
``results.json`` (every run's logged series, alerts and derived numbers), ``tables.md`` and
three PNG figures. ``docs/evidence.md`` explains the method and shows the full run's tables.

1. **Failure corpus**: each kind of failure (``evidence_cases.FAILURES``) is its architecture's
   base run with one thing changed, x seeds; each run's ground-truth "went wrong at" step is
   computed from its own logged series without ww_monitor (``evidence_metrics.GROUND_TRUTHS``).
   Per run: the first alert, the first alert whose (rule, layer) no healthy run of the
   architecture raised (a "new" alert: the detection), lead times against the ground truth,
   against ``EarlyStopping(monitor="val_loss", patience=3)`` (Lightning's own decision method
   replayed on the logged validation losses, see ``evidence_metrics.early_stopping_step``) and
   against a NaN/Inf check on the training loss; the same for ``AlphaDriftEarlyStopping()``.
2. **Healthy corpus**: the base runs (every seed) and a width x depth x optimizer x schedule
   grid per architecture; every alert listed (each is a false alarm).
3. **Model ranking** (``evidence_ranking.py``): 2^5 hyperparameter variants of
   ``examples/sweep.py``'s MLP; Spearman and Kendall correlation of the reliable-layer means of
   ``wwm.analyze(model).summary()`` and of the final training loss with test accuracy, with
   bootstrap confidence intervals.

Monitor settings: ``WeightWatcherCallback()`` at its defaults (a snapshot every epoch, default
``AlertConfig``) except ``blocking=True`` and ``figures_every_n_snapshots=None``. Blocking makes
the tables reproducible: in the default background mode a snapshot's alerts arrive one or more
hooks later, and the default cost budget (``max_overhead``) defers snapshots according to how
fast this shared machine happens to run, so alert steps would change from run to run. Figures
change nothing measured here. ``AlphaDriftEarlyStopping()`` runs at its defaults (floor 2.0,
warm-up); its decision is recorded and the run continues (``evidence_tasks.shadow_alpha_drift``).
One torch thread (``--threads``); everything seeded, so a rerun gives the same tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import evidence_cases as C  # noqa: E402
import evidence_figures as F  # noqa: E402
import evidence_metrics as M  # noqa: E402
import evidence_ranking as R  # noqa: E402
import evidence_report as P  # noqa: E402

from ww_monitor.monitoring.alerts import ALPHA_LOW_EXCLUDE, RULES  # noqa: E402

#: What the callback runs with (module docstring: why these two differ from the defaults).
MONITOR_KWARGS = {"blocking": True, "figures_every_n_snapshots": None}
#: The alert rules as they were before the model-level band conditions and the shrinking rule.
PREVIOUS_DEFAULTS = {"alpha_low_sigmas": 0.0, "alpha_low_min_share": 0.0, "alpha_high_min_share": 0.0,
                     "enabled": tuple(r for r in RULES if r != "shrinking")}
#: Alert settings whose effect on the same runs is replayed (``evidence_replay``): the defaults
#: first, the previous defaults, then one change at a time from the defaults.
WHAT_IF = {
    "defaults": {},
    "previous defaults (any one layer outside [2, 6]; no shrinking rule)": PREVIOUS_DEFAULTS,
    "previous defaults + shrinking": {**PREVIOUS_DEFAULTS, "enabled": RULES},
    "alpha_low: no share condition (alpha_low_min_share=0)": {"alpha_low_min_share": 0.0},
    "alpha_low: no margin (alpha_low_sigmas=0)": {"alpha_low_sigmas": 0.0},
    "alpha_low: 1 standard error (alpha_low_sigmas=1)": {"alpha_low_sigmas": 1.0},
    "alpha_low only on heavy-tailed layers, no margin or share (replay only)":
        {"alpha_low_sigmas": 0.0, "alpha_low_min_share": 0.0, "low_phases": ("heavy-tailed",)},
    "alpha_high on any one layer (alpha_high_min_share=0)": {"alpha_high_min_share": 0.0},
    "alpha_high like alpha_low: 2 standard errors, more than 20%":
        {"alpha_high_sigmas": 2.0, "alpha_high_min_share": 0.2},
    "alpha_high = 4": {"alpha_high": 4.0},
    "alpha_confirm_snapshots = 1": {"alpha_confirm_snapshots": 1},
    "alpha_confirm_snapshots = 3": {"alpha_confirm_snapshots": 3},
    "alpha_low also on attention q, k (alpha_low_exclude=())": {"alpha_low_exclude": ()},
    "alpha_low on no attention projection (v, out_proj excluded too)":
        {"alpha_low_exclude": (*ALPHA_LOW_EXCLUDE, r"self_attn\.(v|out_proj)$")},
}
DEFAULT_OUT = os.path.join(HERE, "results", "evidence")
FULL = {"seeds": 3, "healthy_grid": 16, "variants": None, "resamples": 2000}
QUICK = {"seeds": 1, "healthy_grid": 2, "variants": None, "resamples": 1000}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 healthy grid points per architecture, 16 variants")
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for results.json, tables.md and the figures")
    ap.add_argument("--cases", default="all", help="failure kinds, comma separated, or 'all' or 'none'")
    ap.add_argument("--archs", default=",".join(C.ARCHS), help="architectures, comma separated")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per failure kind and base run")
    ap.add_argument("--healthy-grid", type=int, default=None,
                    help="healthy grid points per architecture besides the base runs (at most 16)")
    ap.add_argument("--variants", type=int, default=None, help="ranking variants (first N of the grid; 0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.seeds = args.seeds if args.seeds is not None else preset["seeds"]
    args.healthy_grid = args.healthy_grid if args.healthy_grid is not None else preset["healthy_grid"]
    args.resamples = preset["resamples"]
    args.archs = [a for a in args.archs.split(",") if a]
    bad = [a for a in args.archs if a not in C.ARCHS]
    kinds = ([] if args.cases == "none" else list(C.FAILURES) if args.cases == "all"
             else [C.KIND_BY_NAME.get(k, k) for k in args.cases.split(",") if k])
    bad += [k for k in kinds if isinstance(k, str)]
    if bad:
        ap.error(f"unknown {bad}; architectures: {C.ARCHS}, kinds: {[k.name for k in C.FAILURES]}")
    args.kinds = kinds
    return args


def main(argv=None) -> dict:
    """Run the benchmark; returns what it wrote to ``results.json``. Called in-process (the
    test does), it puts back the torch thread count and Lightning's log levels it changed."""
    args = parse(argv)
    import pytorch_lightning  # noqa: F401  (its loggers exist once imported)
    import torch

    quiet = ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric")
    levels, threads = {n: logging.getLogger(n).level for n in quiet}, torch.get_num_threads()
    try:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)
        C.set_threads(args.threads)
        return run(args, argv)
    finally:
        torch.set_num_threads(threads)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def run(args, argv) -> dict:
    seeds = list(range(args.seeds))
    started, load_before, t0 = datetime.datetime.now().isoformat(timespec="seconds"), uptime(), time.perf_counter()

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    healthy_specs = C.healthy_specs(args.archs, seeds, args.healthy_grid)
    failure_specs = C.failure_specs(args.kinds, args.archs, seeds)
    records = {}
    for group, specs in (("healthy", healthy_specs), ("failure", failure_specs)):
        for i, spec in enumerate(specs):
            records[spec.label] = rec = C.train(spec, MONITOR_KWARGS)
            say(f"  {group} {i + 1}/{len(specs)}: {spec.label} ({rec['seconds']:.1f} s, "
                f"{len(M.raised(rec))} alerts)")
    healthy_recs = [r for r in records.values() if r["spec"]["kind"] == "healthy"]
    pairs = M.healthy_pairs(healthy_recs)
    failures = [P.failure_row(r, pairs) for r in records.values() if r["spec"]["kind"] != "healthy"]
    healthy = [P.healthy_row(r) for r in healthy_recs]

    n_var = args.variants if args.variants is not None else len(R.variants(args.quick))
    rank_rows = R.run(args.quick, limit=n_var, progress=say) if n_var else []
    result = {
        "meta": {"command": " ".join(["python benchmarks/bench_evidence.py",
                                      *(argv if argv is not None else sys.argv[1:])]),
                 "started": started, "uptime_before": load_before, "machine": platform.platform(),
                 "cpus": os.cpu_count(), "python": platform.python_version(), "monitor_kwargs": MONITOR_KWARGS,
                 "es_patience": M.ES_PATIENCE, "ground_truth_rules": M.GROUND_TRUTH_RULES},
        "healthy_pairs": {a: sorted(map(list, p)) for a, p in pairs.items()},
        "failures": failures, "kind_summary": P.kind_summary(failures), "healthy": healthy,
        "overall": P.overall(failures, healthy),
        "ranking": P.ranking(rank_rows, args.resamples),
        "what_if": P.what_if(records, WHAT_IF) if failures else [],
        "records": records,
    }
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    result["meta"]["uptime_after"] = uptime()
    write(result, args.out)
    say(f"wrote {args.out} in {result['meta']['wall_seconds']:.0f} s; load before: {load_before}; "
        f"after: {result['meta']['uptime_after']}")
    return result


def write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    text = P.markdown(result)
    meta = result["meta"]
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(f"`{meta['command']}` ({meta['started']}, {meta['wall_seconds']:.0f} s; "
                f"load before: `{meta['uptime_before']}`, after: `{meta['uptime_after']}`)\n\n{text}")
    print(text)
    records = result["records"]
    by_label = {r["label"]: records[r["label"]] for r in result["failures"]}
    if result["failures"]:
        F.timelines(by_label, result["failures"], os.path.join(out, "failures.png"))
        F.lead_times(result["failures"], os.path.join(out, "lead_times.png"))
    if result["ranking"]["correlations"]:
        F.ranking(result["ranking"]["rows"], result["ranking"]["correlations"], os.path.join(out, "ranking.png"))


if __name__ == "__main__":
    main()
