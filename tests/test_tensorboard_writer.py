"""The ESD histogram binned by the worker, and its round trip through a real TensorBoard event file."""

import numpy as np
import pytest

from ww_monitor.outputs.tensorboard_writer import LoggerWriter, esd_bins, esd_histogram


def test_esd_histogram_bins_log10_of_the_finite_positive_eigenvalues():
    rng = np.random.default_rng(0)
    ev = np.concatenate([rng.lognormal(0.0, 1.5, 500), [0.0, -1e-9, np.nan, np.inf]])
    h = esd_histogram(ev)
    kept = np.log10(ev[np.isfinite(ev) & (ev > 0)])
    assert h.num == kept.size == 500 and sum(h.bucket_counts) == 500
    assert len(h.bucket_counts) == len(h.bucket_limits) == esd_bins(500) == 16  # ceil(2 * 500^(1/3))
    assert h.min == pytest.approx(kept.min()) and h.max == pytest.approx(kept.max())
    assert h.bucket_limits[-1] == pytest.approx(kept.max())
    assert h.sum == pytest.approx(kept.sum()) and h.sum_squares == pytest.approx((kept**2).sum())
    expected, _ = np.histogram(kept, bins=esd_bins(500), range=(kept.min(), kept.max()))
    assert list(h.bucket_counts) == expected.tolist()


def test_esd_bins_grow_with_the_eigenvalue_count():
    """Issue 10: a 10-eigenvalue head gets 5 buckets, not a comb of 64."""
    assert [esd_bins(n) for n in (1, 10, 64, 512, 4096, 10**6)] == [5, 5, 8, 16, 32, 64]
    assert len(esd_histogram(np.geomspace(1.0, 100.0, 10)).bucket_counts) == 5


def test_esd_histogram_degenerate_inputs():
    assert esd_histogram(None) is None
    assert esd_histogram(np.zeros(10)) is None
    h = esd_histogram(np.full(7, 3.0))  # one distinct value still makes a valid histogram
    assert h.num == 7 and sum(h.bucket_counts) == 7 and h.min == h.max == pytest.approx(np.log10(3.0))
    assert h.bucket_limits[0] > h.min - 0.5 and h.bucket_limits[-1] == pytest.approx(h.max + 0.5)


def test_precomputed_histogram_reaches_the_event_file(tmp_path):
    import torch
    from pytorch_lightning.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import ww_monitor

    torch.manual_seed(1)
    (layer,) = ww_monitor.analyze(torch.nn.Sequential(torch.nn.Linear(300, 400))).layers
    ev = np.asarray(layer.eigenvalues)
    layer_name = layer.name
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    writer = LoggerWriter()
    writer.log_tensorboard([logger], 7, [layer], text=False, precomputed={layer_name: esd_histogram(ev)})
    writer.flush([logger])
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    acc.Reload()
    (event,) = acc.Histograms(f"ww/esd/{layer_name}")
    assert event.step == 7 and event.histogram_value.num == 300
    assert sum(event.histogram_value.bucket) == 300
    assert event.histogram_value.max == pytest.approx(np.log10(ev).max())
