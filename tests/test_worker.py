"""Snapshots and background workers, without Lightning."""

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from ww_monitor.analysis.analyze import AnalysisConfig, analyze_matrices, select_matrices
from ww_monitor.monitoring.analysis_job import AnalysisOutput, analyze_snapshot
from ww_monitor.monitoring.snapshot import take_snapshot
from ww_monitor.monitoring.worker import InlineWorker, ProcessWorker, ThreadWorker, configure_current_thread


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Linear(32, 16).to(torch.float64))


def test_snapshot_is_an_exact_independent_copy():
    model = _model()
    config = AnalysisConfig()
    mats, _ = select_matrices(model, config)
    snap = take_snapshot(mats, index=3, step=30, epoch=1)
    assert snap.nbytes == sum(m.weight.numel() * m.weight.element_size() for m in mats)
    assert len(snap.buffers[0]) == 2  # one flat buffer per dtype
    copies = snap.matrices()
    for live, copy in zip(mats, copies):
        assert copy.name == live.name and copy.kind == live.kind and copy.eig_scale == live.eig_scale
        assert torch.equal(copy.weight, live.weight)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the next optimizer step must not reach the snapshot
    assert not torch.equal(copies[0].weight, mats[0].weight)
    ref, _ = analyze_matrices(select_matrices(_model(), config)[0], config)
    out = analyze_snapshot(snap, config)
    assert [r.name for r in out.results] == [r.name for r in ref]
    for a, b in zip(out.results, ref):
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-12, atol=0)
    assert snap.buffers == [] and out.nbytes > 0  # memory released after the analysis


def _slow(x, delay=0.2):
    time.sleep(delay)
    return x * 2


def _boom():
    raise ValueError("bad layer")


@pytest.mark.parametrize("cls", [InlineWorker, ThreadWorker])
def test_worker_results_errors_and_pending(cls):
    w = cls()
    w.submit("analysis", "a", _slow, (21,), nbytes=100)
    w.submit("analysis", "b", _boom)
    w.submit("figures", "c", _slow, (1, 0.0))
    assert w.wait(timeout=10)
    done = {r.key: r for r in w.poll()}
    assert done["a"].value == 42 and done["a"].error is None
    assert "ValueError: bad layer" in done["b"].error
    assert done["c"].value == 2
    assert w.pending() == 0 and w.peak_inflight_bytes >= 100 and w.inflight_bytes == 0
    assert w.poll() == []
    assert w.close(timeout=5)


def test_thread_worker_does_not_block_and_filters_by_kind():
    w = ThreadWorker(num_threads=1, nice=5)
    t0 = time.perf_counter()
    w.submit("analysis", 1, _slow, (1, 0.3))
    assert time.perf_counter() - t0 < 0.1  # submit returns at once
    assert w.pending("analysis") == 1 and w.pending("figures") == 0
    assert not w.wait(timeout=0.01)
    w.submit("figures", 2, _slow, (2, 0.0))
    assert w.wait(timeout=5, kinds=("analysis",))
    assert [r.key for r in w.poll(("analysis",))] == [1]
    assert w.wait(timeout=5)
    assert [r.key for r in w.poll()] == [2]
    assert w._thread.daemon
    assert w.close(timeout=5) and not w.alive


def test_cancel_drops_queued_jobs_and_close_has_a_timeout():
    w = ThreadWorker()
    w.submit("analysis", 1, _slow, (1, 0.3))
    w.submit("analysis", 2, _slow, (1, 0.3))
    time.sleep(0.05)
    t0 = time.perf_counter()
    assert w.close(timeout=5, cancel=True)
    assert time.perf_counter() - t0 < 1.0  # the queued job was not run
    errors = {r.key: r.error for r in w.poll()}
    assert errors == {1: None, 2: "cancelled"}

    w = ThreadWorker()
    w.submit("analysis", 1, _slow, (1, 1.0))
    t0 = time.perf_counter()
    assert not w.close(timeout=0.1)  # still running: close gives up after the timeout
    assert time.perf_counter() - t0 < 0.5


def _count_in_new_thread():
    box = []
    t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
    t.start()
    t.join()
    return box[0]


def test_worker_thread_settings_do_not_leak_to_other_threads():
    main_before, new_before = torch.get_num_threads(), _count_in_new_thread()
    box = {}

    def run():
        configure_current_thread(1, 3)
        box["worker"] = torch.get_num_threads()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert box["worker"] == 1
    assert torch.get_num_threads() == main_before
    assert _count_in_new_thread() == new_before


def test_process_worker_analyses_a_shared_memory_snapshot():
    config = AnalysisConfig()
    mats, _ = select_matrices(_model(), config)
    snap = take_snapshot(mats, index=0, step=5, epoch=0, share_memory=True)
    assert all(b.is_shared() for b in snap.buffers[0].values())
    w = ProcessWorker(num_threads=1, nice=0)
    try:
        w.submit("analysis", 0, analyze_snapshot, (snap, config, 0), nbytes=snap.nbytes)
        w.submit("analysis", 1, _boom)
        assert w.wait(timeout=120)
        done = {r.key: r for r in w.poll()}
    finally:
        assert w.close(timeout=10)
    out = done[0].value
    assert isinstance(out, AnalysisOutput) and out.step == 5
    assert [r.name for r in out.results] == [m.name for m in mats]
    assert "bad layer" in done[1].error


def test_subprocess_worker_runs_jobs_without_the_callers_main(tmp_path):
    import math
    import operator

    from ww_monitor.monitoring.subprocess_worker import SubprocessWorker

    w = SubprocessWorker(num_threads=1, nice=0)
    try:
        w.submit("figures", "ok", operator.mul, (np.arange(3.0), 2))
        w.submit("figures", "bad", math.sqrt, (-1.0,))
        w.submit("figures", "unpicklable", operator.mul, (lambda: 1, 2))
        w.submit("figures", "not-importable-there", _slow, (1, 0.0))  # lives in this test module only
        w.submit("figures", "after", operator.add, (1, 2))
        assert w.wait(timeout=120)
        done = {r.key: r for r in w.poll()}
    finally:
        assert w.close(timeout=10)
    np.testing.assert_array_equal(done["ok"].value, [0.0, 2.0, 4.0])
    assert "ValueError: math domain error" in done["bad"].error
    assert "could not send the job" in done["unpicklable"].error
    assert "could not load the job" in done["not-importable-there"].error
    assert done["after"].value == 3  # the child survived all of that


def test_thread_worker_survives_base_exceptions():
    """A SystemExit raised inside a job is reported as that job's error; the thread lives on."""
    from ww_monitor.monitoring.worker import ThreadWorker

    def bad():
        raise SystemExit(3)

    w = ThreadWorker(num_threads=1, nice=0)
    try:
        w.submit("analysis", 1, bad)
        w.submit("analysis", 2, lambda: 42)
        assert w.wait(timeout=30, kinds=("analysis",))
        results = {r.key: r for r in w.poll(("analysis",))}
        assert "SystemExit" in results[1].error and results[2].value == 42
    finally:
        w.close(timeout=5)
