"""benchmarks/bench_gpu.py in its reduced CPU mode, so the GPU benchmark cannot rot unnoticed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gpu_cpu_mode_prints_its_table():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--cpu"], env=env,
                         capture_output=True, text=True, timeout=240, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| bench_gpu on CPU")
    labels = [r.split(" | ")[0] for r in rows[1:]]  # the |---| separator does not start with "| "
    assert labels == ["| 64x64 float32", "| 64x64 float64", "| 192x64 float32", "| 192x64 float64",
                      "| tiny-shaped stack (14 matrices)", "| training loop, 32-wide MLP, snapshot every 3 steps"]
    # Snapshots due while the worker still runs are skipped (on_lag="skip"), so at least the final one.
    assert int(re.search(r"; (\d+) snapshots\)", rows[-1]).group(1)) >= 1
