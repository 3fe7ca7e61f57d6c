"""Overhead of WeightWatcherCallback on a CPU training run, and the host memory of a snapshot.

What it measures (all in one process, so every configuration sees the same machine):

1. Calibration: the wall time of one snapshot's analysis (with the worker's settings: one
   intra-op thread) and of one training batch; the number of batches per epoch is chosen so
   the analysis costs ``--fraction`` (default 10%) of an epoch. The measured fraction, against
   the median epoch time of the runs without the callback, is printed at the end.
2. Training runs of ``--epochs`` epochs with a TensorBoard logger, in configurations
   ``none`` (no callback), ``background`` (snapshot every epoch, analysed in the background
   worker; the default callback settings except figures) and ``blocking`` (the same, waiting
   for each analysis). Configurations are interleaved, ``--repeats`` times, in a rotating
   order; the report gives the median wall time of ``trainer.fit`` per configuration and its
   ratio to ``none``.
3. Memory: (a) bytes of weights held by in-flight snapshots (exact; the callback's
   ``stats["peak_inflight_bytes"]``) relative to the analysed weights' size, and (b) the peak
   resident-set growth of the process while one snapshot is copied and analysed (Linux
   ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), i.e. the copy plus the
   analysis' float64 working memory.
4. Adjacent epochs (``--alt-runs``): long runs with a snapshot every second epoch, timing the
   epoch that overlaps an analysis against its idle neighbour, with the same runs without the
   callback as the control. Whole-run times on these VMs drift by +-20%; neighbouring epochs
   see the same conditions, so this is the steadier estimate of what an analysis costs.

Figures are off in the timed runs (``--figures`` adds a run with the default figure settings):
rendering is a separate, low-frequency cost reported on its own line.

    python benchmarks/bench_callback.py                 # ~6 minutes on 2 cores
    python benchmarks/bench_callback.py --repeats 5 --epochs 8 --alt-runs 3   # the README's figures
    python benchmarks/bench_callback.py --repeats 3 --epochs 4 --extra nice0 process

5. Short runs at the defaults (``--short-run``, only this part): the quickstart's digits MLP for
   ``--short-epochs`` epochs (~10 s) with a TensorBoard logger, ``WeightWatcherCallback()`` with
   every default against no callback, interleaved, ``--repeats`` times; then ``fast_dev_run``
   and a one-step run (``max_steps=1``): the callback's time on the training thread and the
   wall-time difference, medians.

    python benchmarks/bench_callback.py --short-run --repeats 7     # the README's short-run figures
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Measure the ww_monitor of this checkout, whatever copy is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _build_model(width: int, depth: int, classes: int = 10):
    import pytorch_lightning as pl

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            layers = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            return self.head(self.body(x))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    torch.manual_seed(0)
    return MLP()


def _data(batches: int, batch_size: int, width: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batches * batch_size, width, generator=g)
    y = torch.randint(0, 10, (batches * batch_size,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _analysis_seconds(model, threads: int | None, repeats: int = 5) -> float:
    """Fastest wall time of one snapshot + analysis in a ThreadWorker configured like the callback's
    (the fastest of a few: other load on the machine only ever adds time)."""
    from ww_monitor.analysis.analyze import AnalysisConfig, select_matrices
    from ww_monitor.monitoring.analysis_job import CHUNK_BYTES, analyze_snapshot
    from ww_monitor.monitoring.snapshot import take_snapshot
    from ww_monitor.monitoring.worker import ThreadWorker

    config = AnalysisConfig()
    worker = ThreadWorker(num_threads=threads, nice=0)
    times = []
    for _ in range(repeats):
        mats, _ = select_matrices(model, config)
        snap = take_snapshot(mats)
        t0 = time.perf_counter()
        worker.submit("analysis", 0, analyze_snapshot, (snap, config, 0, CHUNK_BYTES, True))  # + histograms
        worker.wait()
        times.append(time.perf_counter() - t0)
        worker.poll()
    worker.close()
    return min(times)


def _batch_seconds(model, batch_size: int, width: int, steps: int = 20) -> float:
    """Fastest median over three bursts of plain training steps (the least disturbed by other load)."""
    opt = model.configure_optimizers()
    x = torch.randn(batch_size, width)
    y = torch.randint(0, 10, (batch_size,))
    bursts = []
    for _ in range(3):
        times = []
        for i in range(steps + 3):
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        bursts.append(statistics.median(times))
    return min(bursts)


def _make_callback(config: str, figures: bool, every_n_epochs: int = 1):
    from ww_monitor import WeightWatcherCallback

    kw = dict(every_n_epochs=every_n_epochs, figures_every_n_snapshots=5 if figures else None)
    if config == "none":
        return None
    if config == "blocking":
        kw["blocking"] = True
    elif config == "nice0":
        kw["worker_nice"] = 0
    elif config == "nice19":
        kw["worker_nice"] = 19
    elif config == "idle":
        kw["worker_idle"] = True
    elif config == "idle-wait":
        kw.update(worker_idle=True, on_lag="wait")
    elif config == "wait":
        kw["on_lag"] = "wait"
    elif config == "threads2":
        kw["worker_threads"] = 2
    elif config == "process":
        kw["worker_type"] = "process"
    elif config not in ("background", "figures"):
        raise ValueError(config)
    return WeightWatcherCallback(**kw)


def _run(config: str, args, logdir: str, figures: bool = False, every_n_epochs: int = 1
         ) -> tuple[float, dict, list[float]]:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    model = _build_model(args.width, args.depth)
    cb = _make_callback(config, figures, every_n_epochs)
    epoch_times: list[float] = []

    class EpochTimer(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            epoch_times.append(time.perf_counter() - self.t0)

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=TensorBoardLogger(logdir, name=config),
        callbacks=[EpochTimer()] + ([cb] if cb is not None else []), enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=10,
    )
    loader = _data(args.batches, args.batch_size, args.width)
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    wall = time.perf_counter() - t0
    stats = dict(cb.stats) if cb is not None else {}
    if cb is not None:
        stats["snapshots_logged"] = len(cb.history)
    return wall, stats, epoch_times


def _alternating(args, logdir: str) -> dict[str, list[float]]:
    """Adjacent-epoch ratios in long runs with a snapshot every second epoch.

    Epochs 2, 4, 6, ... each overlap the background analysis of the snapshot taken at the end of
    the epoch before; epochs 3, 5, 7, ... run with the worker idle. The ratio of each such pair
    of neighbouring epochs measures what one analysis in flight costs an epoch, and is far less
    exposed than whole-run times to this machine's slow drifts in speed (neighbours see the same
    conditions). ``none`` (no callback) is the control: its ratios show the method's own spread.
    """
    alt = argparse.Namespace(**{**vars(args), "epochs": args.alt_epochs})
    ratios: dict[str, list[float]] = {"none": [], "background": []}
    ratios.update({c: [] for c in args.alt_extra})
    for _ in range(args.alt_runs):
        for config in ratios:
            _, _, ep = _run(config, alt, logdir, every_n_epochs=2)
            ratios[config] += [ep[i] / ep[i + 1] for i in range(2, len(ep) - 1, 2)]  # epoch 0: warm-up
    return ratios


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def _pressure() -> str:
    """CPU pressure (share of time some runnable task waited for a CPU), when the kernel has PSI."""
    try:
        with open("/proc/pressure/cpu") as f:
            some = f.readline().split()
        return "CPU pressure avg60 " + some[2].split("=")[1] + "%"
    except (OSError, IndexError):
        return "CPU pressure n/a"


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _memory_in_fresh_process(args) -> dict:
    """Run :func:`_memory` in a spawned process: a fresh heap, so freed memory of earlier runs
    cannot hide the growth."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_memory, (argparse.Namespace(width=args.memory_width, depth=args.depth),))


def _memory(args) -> dict:
    """Peak RSS growth while one snapshot is copied and analysed, relative to the weights."""
    from ww_monitor.analysis.analyze import AnalysisConfig, select_matrices
    from ww_monitor.monitoring.analysis_job import analyze_snapshot
    from ww_monitor.monitoring.snapshot import take_snapshot
    from ww_monitor.monitoring.worker import ThreadWorker

    if not os.path.exists("/proc/self/clear_refs"):
        return {}
    model = _build_model(args.width, args.depth)
    config = AnalysisConfig()
    worker = ThreadWorker(num_threads=1, nice=0)
    small = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))  # warm up the code paths, not the heap
    worker.submit("warmup", 0, analyze_snapshot, (take_snapshot(select_matrices(small, config)[0]), config, 0))
    worker.wait()
    worker.poll()
    mats, _ = select_matrices(model, config)
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in mats)
    gc.collect()
    base = _vm("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return {}
    snap = take_snapshot(mats)
    after_copy = _vm("VmHWM")
    snap_bytes = snap.nbytes
    worker.submit("analysis", 0, analyze_snapshot, (snap, config, 0), nbytes=snap_bytes)
    del snap
    worker.wait()
    worker.poll()
    peak = _vm("VmHWM")
    worker.close()
    return {
        "weight_bytes": weight_bytes,
        "snapshot_bytes": snap_bytes,
        "copy_rss": (after_copy - base) / weight_bytes,
        "peak_rss": (peak - base) / weight_bytes,
    }


def _digits_fit(with_callback: bool, logdir: str, **trainer_kw) -> tuple[float, float, tuple[int, int, int]]:
    """Wall time of ``trainer.fit`` of the quickstart's digits MLP, the callback's
    ``train_thread_seconds`` (0 without it) and its snapshots (taken, deferred, skipped)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
    from quickstart import digits_loaders, make_model

    from ww_monitor import WeightWatcherCallback

    pl.seed_everything(0, verbose=False)
    train, val = digits_loaders()
    cb = WeightWatcherCallback() if with_callback else None  # every default
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=TensorBoardLogger(logdir, name="digits"),
                         callbacks=[cb] if cb else [], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, log_every_n_steps=5, **trainer_kw)
    model = make_model(pl)
    gc.collect()
    t0 = time.perf_counter()
    trainer.fit(model, train, val)
    wall = time.perf_counter() - t0
    if cb is None:
        return wall, 0.0, (0, 0, 0)
    s = cb.stats
    return wall, s["train_thread_seconds"], (s["snapshots_taken"], s["snapshots_deferred"], s["snapshots_skipped"])


def _short_runs(args) -> None:
    """Item 5 of the module docs: short runs and fast_dev_run at the callback's defaults."""
    cases = {"short": dict(max_epochs=args.short_epochs), "fast_dev_run": dict(fast_dev_run=True),
             "one step": dict(max_steps=1)}
    walls = {(c, w): [] for c in cases for w in (False, True)}
    hooks = {c: [] for c in cases}
    counts = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as logdir:
        _digits_fit(True, logdir, max_steps=2)  # warm-up: imports, first-use caches
        for rep in range(args.repeats):
            for case, kw in cases.items():
                for with_cb in ((False, True) if rep % 2 == 0 else (True, False)):
                    wall, hook, taken = _digits_fit(with_cb, logdir, **kw)
                    walls[(case, with_cb)].append(wall)
                    if with_cb:
                        hooks[case].append(hook)
                        counts[case].append(taken)
            print(f"  repeat {rep + 1}/{args.repeats}: short {walls[('short', False)][-1]:.2f}s without, "
                  f"{walls[('short', True)][-1]:.2f}s with the callback", flush=True)
    print(f"\nload average now {os.getloadavg()[0]:.2f}, {_pressure()}")
    print(f"{'run (digits MLP)':<18}{'without s':>11}{'with s':>9}{'ratio':>8}{'paired':>8}{'extra s':>9}"
          f"{'hooks s':>9}  snapshots taken/deferred/skipped")
    for case in cases:
        a, b = walls[(case, False)], walls[(case, True)]
        paired = statistics.median(y / x for x, y in zip(a, b))
        extra = statistics.median(y - x for x, y in zip(a, b))
        print(f"{case:<18}{statistics.median(a):>11.2f}{statistics.median(b):>9.2f}"
              f"{statistics.median(b) / statistics.median(a):>8.3f}{paired:>8.3f}{extra:>9.2f}"
              f"{statistics.median(hooks[case]):>9.3f}  "
              + " ".join("/".join(map(str, c)) for c in counts[case]))
    print("ratio: median with / median without; paired: median over repeats of with / without run back to back; "
          "extra s: median paired wall-time difference; hooks s: median time in the callback's hooks on the "
          "training thread (stats['train_thread_seconds']); snapshots: per repeat, deferred by max_overhead, skipped "
          "because the analysis lagged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.10, help="analysis time / epoch time to aim for")
    parser.add_argument("--batches", type=int, default=None, help="batches per epoch (default: calibrated)")
    parser.add_argument("--extra", nargs="*", default=[], choices=["nice0", "nice19", "idle", "idle-wait", "wait", "threads2", "process"],
                        help="more background variants to time")
    parser.add_argument("--figures", action="store_true", help="also time a run with default figures")
    parser.add_argument("--train-threads", type=int, default=None, help="torch intra-op threads for training")
    parser.add_argument("--memory-width", type=int, default=2048, help="MLP width for the memory measurement")
    parser.add_argument("--alt-runs", type=int, default=2, help="long runs per config for the adjacent-epoch "
                        "measurement (0: skip it)")
    parser.add_argument("--alt-epochs", type=int, default=20, help="epochs of each adjacent-epoch run")
    parser.add_argument("--alt-extra", nargs="*", default=[], choices=["nice0", "nice19", "idle", "process"],
                        help="more background variants for the adjacent-epoch measurement")
    parser.add_argument("--short-run", action="store_true", help="only the short-run / fast_dev_run measurement "
                        "at the callback's defaults (item 5)")
    parser.add_argument("--short-epochs", type=int, default=6, help="epochs of the short digits run (~10 s)")
    args = parser.parse_args()
    if args.train_threads:
        torch.set_num_threads(args.train_threads)

    import pytorch_lightning  # noqa: F401  before quieting: importing it configures its loggers

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="pytorch_lightning")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}, {_pressure()}")
    if args.short_run:
        _short_runs(args)
        return
    model = _build_model(args.width, args.depth)
    t_analysis = _analysis_seconds(model, threads=1)
    t_analysis_all = _analysis_seconds(model, threads=None)
    t_batch = _batch_seconds(model, args.batch_size, args.width)
    with tempfile.TemporaryDirectory() as logdir:  # Lightning adds per-batch overhead: measure it too
        probe = argparse.Namespace(**{**vars(args), "epochs": 1, "batches": 30})
        t_batch = max(t_batch, min(min(_run("none", probe, logdir)[2]) for _ in range(2)) / 30)
    if args.batches is None:
        args.batches = max(2, math.ceil(t_analysis / (args.fraction * t_batch)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: MLP {args.depth}x{args.width} + head ({n_params / 1e6:.2f} M parameters), batch {args.batch_size}")
    print(f"calibration: analysis of one snapshot {t_analysis * 1e3:.0f} ms (worker, 1 thread; "
          f"{t_analysis_all * 1e3:.0f} ms with all threads), one training batch {t_batch * 1e3:.0f} ms "
          f"-> {args.batches} batches per epoch")

    configs = ["none", "background", "blocking"] + list(args.extra) + (["figures"] if args.figures else [])
    walls: dict[str, list[float]] = {c: [] for c in configs}
    outside: dict[str, list[float]] = {c: [] for c in configs}  # fit time not inside an epoch (start, end)
    epochs: dict[str, list[float]] = {c: [] for c in configs}
    stats: dict[str, list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as logdir:
        for rep in range(args.repeats):
            order = configs[rep % len(configs):] + configs[: rep % len(configs)]
            for c in order:
                wall, st, ep = _run(c, args, logdir, figures=c == "figures")
                walls[c].append(wall)
                epochs[c].extend(ep)
                outside[c].append(wall - sum(ep))
                stats[c].append(st)
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{c} {walls[c][-1]:.2f}s" for c in configs),
                  flush=True)

    base = statistics.median(walls["none"])
    epoch_none = statistics.median(epochs["none"])
    print()
    print(f"one snapshot's analysis = {t_analysis / epoch_none:.1%} of an epoch "
          f"({t_analysis * 1e3:.0f} ms / median epoch {epoch_none * 1e3:.0f} ms without the callback)")
    print(f"load average now {os.getloadavg()[0]:.2f}, {_pressure()}")
    print("ratio = median(config) / median(none); paired = median over repeats of config / none of the same "
          "repeat (run back to back, so it sees the same background load)")
    print(f"{'config':<12}{'median fit s':>14}{'min-max s':>14}{'ratio':>8}{'paired':>8}{'epoch ms':>10}"
          f"{'epoch ratio':>13}{'outside s':>11}{'hooks s':>9}{'snapshots':>11}{'skipped/run':>13}"
          f"{'peak in-flight':>16}")
    for c in configs:
        med = statistics.median(walls[c])
        paired = statistics.median(a / b for a, b in zip(walls[c], walls["none"]))
        spread = f"{min(walls[c]):.2f}-{max(walls[c]):.2f}"
        st = stats[c][-1] if stats[c] else {}
        snaps = st.get("snapshots_logged", "-")
        skipped = f"{sum(s.get('snapshots_skipped', 0) for s in stats[c]) / len(stats[c]):.1f}" if st else "-"
        peak = (max(s["peak_inflight_bytes"] for s in stats[c]) / max(1, st["snapshot_bytes"])) if st else None
        peak_s = f"{peak:.2f}x snap" if peak is not None else "-"
        hooks = f"{statistics.median(s['train_thread_seconds'] for s in stats[c]):.2f}" if st else "-"
        epoch_med = statistics.median(epochs[c])
        print(f"{c:<12}{med:>14.2f}{spread:>14}{med / base:>8.3f}{paired:>8.3f}"
              f"{epoch_med * 1e3:>10.0f}{epoch_med / epoch_none:>13.3f}{statistics.median(outside[c]):>11.2f}"
              f"{hooks:>9}{snaps!s:>11}{skipped!s:>13}{peak_s:>16}")
    print("epoch ms / epoch ratio: median epoch time, and its ratio to none's (the steady-state cost of a long run; "
          "blocking waits at the epoch end, outside this timer); outside s: median fit time outside epochs "
          "(start-up, the final snapshot and the wait for the last analyses at train end); hooks s: median "
          "stats['train_thread_seconds'], time spent in the callback's hooks on the training thread")

    if args.alt_runs:
        with tempfile.TemporaryDirectory() as logdir:
            alt = _alternating(args, logdir)
        print()
        print(f"adjacent epochs ({args.alt_runs} run(s) of {args.alt_epochs} epochs per config, a snapshot every "
              "2nd epoch): epoch with an analysis in flight / the next epoch, quartiles")
        for config, values in alt.items():
            q1, med, q3 = _quartiles(values)
            print(f"  {config:<12}{med:>7.3f}   [{q1:.3f}, {q3:.3f}]   n={len(values)}")
        for config in args.alt_extra:
            print(f"  {config}: {statistics.median(alt[config]) - statistics.median(alt['none']):+.1%} per analysis "
                  "in flight")
        cost = statistics.median(alt["background"]) - statistics.median(alt["none"])
        print(f"  -> one analysis in flight costs its epoch {cost:+.1%} (background minus the control); with a "
              f"snapshot every epoch and {args.epochs} epochs, the expected whole-run ratio is about "
              f"{1 + cost + statistics.median(outside['background']) / (args.epochs * epoch_none):.3f} "
              "(its outside-epoch time, the train-end wait included, spread over the run)")

    mem = _memory_in_fresh_process(args)
    if mem:
        print()
        print(f"memory (MLP {args.depth}x{args.memory_width}, fresh process): analysed weights "
              f"{mem['weight_bytes'] / 2**20:.1f} MiB; a snapshot holds "
              f"{mem['snapshot_bytes'] / mem['weight_bytes']:.2f}x of them (at most max_pending=1 in flight)")
        print(f"        peak RSS growth: {mem['copy_rss']:.2f}x while copying, {mem['peak_rss']:.2f}x over the "
              "copy and its analysis (float64 working copies of one Gram batch included)")


if __name__ == "__main__":
    main()
