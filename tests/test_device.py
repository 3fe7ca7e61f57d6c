"""The analysis-device plumbing, device-agnostic parts (run on CPU; CUDA takes the same code)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor import device as dev
from ww_monitor.analyze import AnalysisConfig, select_matrices
from ww_monitor.errors import WWMonitorError
from ww_monitor.snapshot import take_snapshot
from ww_monitor.worker import analyze_on_device, analyze_snapshot, run_with_cpu_fallback


def test_analysis_device_is_validated_and_resolved():
    for bad in ("gpu", "cuda:x", 3, "CPU", ""):
        with pytest.raises(WWMonitorError, match="analysis_device"):
            dev.validate_analysis_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(WWMonitorError, match="not available"):
            dev.validate_analysis_device("cuda:0")
    with pytest.raises(WWMonitorError, match="analysis_device"):
        wwm.WeightWatcherCallback(analysis_device="tpu")
    assert dev.resolve_analysis_device("auto", torch.device("cpu")) == torch.device("cpu")
    assert dev.resolve_analysis_device("auto", None) == torch.device("cpu")
    assert dev.resolve_analysis_device("auto", torch.device("cuda:1")) == torch.device("cuda:1")
    assert dev.resolve_analysis_device("cpu", torch.device("cuda:0")) == torch.device("cpu")


def test_cpu_has_no_streams_and_no_budget():
    cpu = torch.device("cpu")
    assert dev.staging_budget(cpu) is None
    assert dev.copy_stream(cpu) is None and dev.analysis_stream(cpu) is None
    assert dev.record_event(None) is None
    with dev.on_stream(None):
        pass


def test_out_of_memory_is_recognised_from_exceptions_and_messages():
    assert dev.is_out_of_memory(MemoryError())
    assert dev.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert dev.is_out_of_memory("eigensolver failed: CUDA out of memory")
    assert not dev.is_out_of_memory(ValueError("shape mismatch"))


def test_out_of_memory_falls_back_with_a_warning_and_other_errors_propagate():
    def oom():
        raise MemoryError("out of memory")

    with pytest.warns(RuntimeWarning, match="ran out of memory on cuda:0"):
        assert run_with_cpu_fallback(oom, "cuda:0") is None
    assert run_with_cpu_fallback(lambda: 7, "cuda:0") == 7
    with pytest.raises(ValueError):
        run_with_cpu_fallback(lambda: (_ for _ in ()).throw(ValueError("bad")), "cuda:0")


def test_streamed_groups_give_the_same_results_as_one_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 80), nn.Linear(80, 40))
    config = AnalysisConfig()
    mats, _ = select_matrices(model, config)
    whole, _ = analyze_on_device(mats, config, torch.device("cpu"))
    tiny_groups, _ = analyze_on_device(mats, config, torch.device("cpu"), chunk_bytes=1)  # one matrix each
    assert [r.name for r in tiny_groups] == [r.name for r in whole]
    assert [r.alpha for r in tiny_groups] == [r.alpha for r in whole]
    snap = take_snapshot(mats)
    out = analyze_snapshot(snap, config, device="cpu")
    assert [r.alpha for r in out.results] == [r.alpha for r in whole] and out.error is None
