"""Soak run: many background snapshots of a tiny model; RSS and thread count must stay flat.

    python benchmarks/soak.py --snapshots 2000 [--every 1] [--report-every 100]
    python benchmarks/soak.py --snapshots 200 --blocking --tensorboard --figures   # blocking-mode figures

``--tensorboard`` logs to a TensorBoard logger (histograms, text and, with ``--figures``, the
default figures every 10 snapshots, drawn from the first second on); ``--blocking`` waits for
each analysis (and renders figures the same way) on the training thread.

Prints RSS (VmRSS from /proc/self/status, Linux) and the live thread count every
``--report-every`` snapshots, then the totals. Exit status 1 if RSS grew by more than
``--max-rss-growth-mb`` after the warm-up or threads did not return to the baseline.
Also used (with a few hundred snapshots) by ``tests/test_soak.py``.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def run(snapshots: int = 300, every: int = 1, report_every: int = 0, warmup: int = 20, worker_nice: int = 0,
        out=sys.stdout, blocking: bool = False, tensorboard: bool = False, figures: bool = False) -> dict:
    import pytorch_lightning as pl

    import ww_monitor

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 32)
            self.head = nn.Linear(32, 4)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(torch.relu(self.fc2(torch.relu(self.fc1(x))))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    samples = {"t0": time.perf_counter(), "rows": [], "max_threads": 0, "warm_rss": None}
    baseline_threads = threading.active_count()

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            n = threading.active_count()
            samples["max_threads"] = max(samples["max_threads"], n)
            taken = len(ww.history)
            if samples["warm_rss"] is None and taken >= warmup:
                samples["warm_rss"] = rss_mb()
            if report_every and taken and taken % report_every == 0 and samples.get("last") != taken:
                samples["last"] = taken
                row = (taken, trainer.global_step, rss_mb(), n, time.perf_counter() - samples["t0"])
                samples["rows"].append(row)
                print(f"snapshots {row[0]:6d}  step {row[1]:7d}  rss {row[2]:8.1f} MB  threads {row[3]:3d}"
                      f"  {row[4]:7.1f} s", file=out, flush=True)
            if taken >= snapshots:
                trainer.should_stop = True

    # max_pending large enough that a busy machine does not turn snapshots into skips; no cost
    # budget: a soak wants every scheduled snapshot
    ww = ww_monitor.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=every, max_pending=4,
                                          worker_nice=worker_nice, blocking=blocking, max_overhead=None,
                                          figures_every_n_snapshots=10 if figures else None,
                                          figures_min_run_seconds=0,
                                          log_histograms=tensorboard, log_text=tensorboard)
    logger = False
    if tensorboard:
        import tempfile

        from pytorch_lightning.loggers import TensorBoardLogger

        logger = TensorBoardLogger(tempfile.mkdtemp(prefix="ww_soak_"), name="soak")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)
    rss_start = rss_mb()
    trainer = pl.Trainer(max_steps=snapshots * every * 20, accelerator="cpu", devices=1, logger=logger,
                         callbacks=[ww, Probe()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Tiny(), DataLoader(TensorDataset(x, y), batch_size=8))
    time.sleep(0.2)
    result = {
        "snapshots": len(ww.history), "taken": ww.stats["snapshots_taken"], "skipped": ww.stats["snapshots_skipped"],
        "failed": ww.stats["snapshots_failed"], "steps": trainer.global_step,
        "seconds": time.perf_counter() - samples["t0"], "rss_start_mb": rss_start,
        "rss_warm_mb": samples["warm_rss"] if samples["warm_rss"] is not None else rss_start,
        "rss_end_mb": rss_mb(), "threads_baseline": baseline_threads, "threads_max": samples["max_threads"],
        "threads_end": threading.active_count(), "worker_gone": ww._worker is None,
    }
    result["rss_growth_mb"] = result["rss_end_mb"] - result["rss_warm_mb"]
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--snapshots", type=int, default=2000, help="snapshots to take (default 2000)")
    p.add_argument("--every", type=int, default=1, help="every_n_train_steps (default 1)")
    p.add_argument("--report-every", type=int, default=100, help="print a line every this many snapshots")
    p.add_argument("--warmup", type=int, default=20, help="snapshots before the RSS reference is taken")
    p.add_argument("--worker-nice", type=int, default=0)
    p.add_argument("--max-rss-growth-mb", type=float, default=50.0)
    p.add_argument("--blocking", action="store_true", help="blocking=True (analysis on the training thread's time)")
    p.add_argument("--tensorboard", action="store_true", help="log to a TensorBoard logger (histograms, text)")
    p.add_argument("--figures", action="store_true", help="default figures (every 10 snapshots) too")
    a = p.parse_args(argv)
    r = run(a.snapshots, a.every, a.report_every, a.warmup, a.worker_nice, blocking=a.blocking,
            tensorboard=a.tensorboard, figures=a.figures)
    print(f"\nsnapshots analysed {r['snapshots']} (taken {r['taken']}, skipped {r['skipped']}, failed {r['failed']}) "
          f"in {r['steps']} steps, {r['seconds']:.1f} s")
    print(f"RSS start {r['rss_start_mb']:.1f} MB, after warm-up {r['rss_warm_mb']:.1f} MB, end {r['rss_end_mb']:.1f} MB"
          f" (growth after warm-up {r['rss_growth_mb']:+.1f} MB)")
    print(f"threads baseline {r['threads_baseline']}, max during {r['threads_max']}, after fit {r['threads_end']};"
          f" worker stopped: {r['worker_gone']}")
    ok = r["rss_growth_mb"] < a.max_rss_growth_mb and r["threads_end"] <= r["threads_baseline"] and r["worker_gone"]
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
