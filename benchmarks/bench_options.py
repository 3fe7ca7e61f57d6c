"""What weightwatcher's options cost next to a plain ``wwm.analyze``.

    python benchmarks/bench_options.py                  # 6 heavy-tailed layers, 7 rounds
    python benchmarks/bench_options.py --repeats 11

One process, one BLAS thread, every option timed in each round in turn (interleaved, so machine
load hits all alike); prints the median CPU time of each and its ratio to the plain analysis.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import ww_monitor as wwm

OPTIONS = {
    "plain": {},
    "detX": {"detX": True},
    "fix_fingers=clip_xmax": {"fix_fingers": "clip_xmax"},
    "fix_fingers=xmin_peak": {"fix_fingers": "xmin_peak"},
    "fit=TPL": {"fit": "TPL"},
    "fit=E_TPL": {"fit": "E_TPL"},
    "randomize": {"randomize": True},
}


def build() -> nn.Module:
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(512, 1024), nn.Linear(768, 768), nn.Linear(1024, 256), nn.Conv2d(128, 256, 3),
                          nn.Linear(300, 600), nn.Linear(384, 384))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.as_tensor(rng.standard_t(3, tuple(layer.weight.shape)) / 20))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build()
    wwm.analyze(model)  # warm-up (imports, allocator)
    times = {k: [] for k in OPTIONS}
    for _ in range(args.repeats):
        for name, kw in OPTIONS.items():
            t0 = time.process_time()
            wwm.analyze(model, **kw)
            times[name].append(time.process_time() - t0)
    base = statistics.median(times["plain"])
    print(f"{'option':<24}{'median CPU s':>14}{'x plain':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<24}{med:>14.3f}{med / base:>10.2f}")


if __name__ == "__main__":
    main()
