"""Issue 7, soak: hundreds of background snapshots leave no growth in memory or threads.

The run itself lives in ``benchmarks/soak.py`` (``python benchmarks/soak.py --snapshots 2000``
for a longer one); here a few hundred snapshots of a tiny model, well under a minute.
"""

import importlib.util
import pathlib
import threading

import pytest

pytest.importorskip("pytorch_lightning")

SOAK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def _soak_module():
    spec = importlib.util.spec_from_file_location("ww_soak", SOAK)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_soak_no_rss_or_thread_growth():
    soak = _soak_module()
    baseline = threading.active_count()
    r = soak.run(snapshots=300, every=1, warmup=30)
    assert r["snapshots"] >= 300, r
    assert r["failed"] == 0, r
    # memory: a fixed bound after warm-up (a leak of one snapshot's results per step would exceed it)
    assert r["rss_growth_mb"] < 50, r
    # threads: the worker (and nothing else of ours) at most while running, gone afterwards
    assert r["threads_max"] <= baseline + 4, r
    assert r["worker_gone"], r
    assert threading.active_count() <= baseline, r
