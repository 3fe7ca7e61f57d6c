"""The analysis-device plumbing, device-agnostic parts (run on CPU; CUDA takes the same code)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis.analyze import AnalysisConfig, select_matrices
from ww_monitor.errors import WWMonitorError
from ww_monitor.monitoring import device as dev
from ww_monitor.monitoring.analysis_job import analyze_on_device, analyze_snapshot, run_with_cpu_fallback
from ww_monitor.monitoring.snapshot import take_snapshot


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


def test_cost_model_scales_with_shape_and_is_calibrated_once():
    from ww_monitor.monitoring.cost import calibration, estimate_seconds

    cal = calibration(1)  # the worker's thread count, as the monitor and the plan calibrate
    assert cal.threads == 1 and min(cal.gram, cal.eig64, cal.eig32, cal.cholesky, cal.per_matrix) > 0
    assert calibration(1) is cal  # cached

    def est(shapes):
        return estimate_seconds(shapes, cal=cal)

    one = est([(256, 128)])
    assert est([(256, 128), (128, 256)]) == pytest.approx(2 * one)
    # A pooled conv stack is one ESD: its fixed cost once, the per-slice work nine times.
    assert est([(9, 128, 64)]) == pytest.approx(9 * est([(128, 64)]) - 8 * cal.per_matrix)
    # Beyond the fixed cost per matrix, the work grows ~M^3: (1024/128)^3 = 512 on one route.
    assert est([(1024, 1024)]) - cal.per_matrix > 100 * (est([(128, 128)]) - cal.per_matrix)


def test_callback_estimates_snapshot_time_and_warns_when_the_schedule_cannot_keep_up(tmp_path):
    import pytorch_lightning as pl

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(1500, 1500)  # ~0.2 s to analyse: far longer than a step

        def training_step(self, batch, _):
            return self.big(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1500)), batch_size=2)
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=1, figures_every_n_snapshots=None,
                                   log_histograms=False, analysis_device="cpu", max_overhead=None)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match="cannot keep up"):
        trainer.fit(Net(), data)
    assert cb.estimated_snapshot_seconds > 0
