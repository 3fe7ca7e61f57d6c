"""History: compact records, pandas export, checkpoint round trip under weights_only."""

import math

import numpy as np
import pytest
import torch

from ww_monitor.analysis.phases import Phase
from ww_monitor.analysis.results import LayerResult, SkippedLayer
from ww_monitor.monitoring.history import HISTORY_METRICS, History, SnapshotRecord


def _result(name, alpha, phase=None):
    r = LayerResult(name=name, kind="linear", N=64, M=32, Q=2.0, num_evals=32)
    r.alpha, r.log_norm, r.rank_loss, r.fit_ok, r.phase = alpha, 1.5, 0, True, phase
    r.eigenvalues = np.linspace(0.1, 3.0, 32)
    return r


def _record(index, step, alpha=3.0):
    results = [_result("a", alpha, Phase.HEAVY_TAILED), _result("b", alpha + 1, None)]
    return SnapshotRecord.from_results(index, step, index, results, ranks=[0, 1],
                                       skipped=[SkippedLayer("c", "linear", (2, 2), "too small")])


def test_record_is_compact_and_has_no_eigenvalues():
    rec = _record(0, 0)
    assert rec.values.shape == (2, len(HISTORY_METRICS)) and rec.values.dtype == np.float64
    assert rec.phases == ("heavy-tailed", None)
    assert rec.metric("alpha") == {"a": 3.0, "b": 4.0}
    assert math.isnan(rec.values[0, HISTORY_METRICS.index("num_traps")])  # None -> NaN
    assert not hasattr(rec, "eigenvalues")


def test_add_orders_by_step_and_rejects_duplicates():
    h = History()
    assert h.add(_record(1, 10)) and h.add(_record(0, 0))
    assert not h.add(_record(2, 10))
    assert h.steps == [0, 10]
    assert h[1].layers is h[0].layers  # names shared between records
    assert h.rank_counts() == {0: 2, 1: 2}


def test_to_pandas_and_metric():
    h = History()
    for i in range(3):
        h.add(_record(i, 5 * i, alpha=2.0 + i))
    df = h.to_pandas()
    assert len(df) == 6
    assert {"snapshot", "step", "epoch", "name", "kind", "rank", "phase", *HISTORY_METRICS} <= set(df.columns)
    wide = h.metric("alpha")
    assert list(wide.index) == [0, 5, 10] and list(wide.columns) == ["a", "b"]
    assert wide.loc[10, "b"] == pytest.approx(5.0)
    names, steps, grid = h.phases()
    assert names == ["a", "b"] and steps == [0, 5, 10]
    # Analysed without a phase: shown as undetermined (issue 10), not as missing.
    assert grid[0] == [Phase.HEAVY_TAILED] * 3 and grid[1] == ["undetermined"] * 3
    assert len(History().to_pandas()) == 0


def test_state_dict_survives_weights_only_load(tmp_path):
    h = History()
    for i in range(3):
        h.add(_record(i, 7 * i))
    path = tmp_path / "h.pt"
    torch.save({"callbacks": {"ww": h.state_dict()}}, path)
    state = torch.load(path, weights_only=True)["callbacks"]["ww"]
    h2 = History()
    h2.load_state_dict(state)
    assert h2.steps == h.steps
    np.testing.assert_array_equal(h2[2].values, h[2].values)
    assert h2[0].phases == h[0].phases and h2[0].skipped == (("c", "too small"),)
    assert h2.to_pandas().equals(h.to_pandas())


def test_load_maps_columns_saved_by_another_version():
    state = _record(0, 0).to_state()
    state["columns"] = ["alpha", "made_up"]
    state["values"] = torch.tensor([[2.5, 1.0], [3.5, 1.0]], dtype=torch.float64)
    rec = SnapshotRecord.from_state(state)
    assert rec.metric("alpha") == {"a": 2.5, "b": 3.5}
    assert math.isnan(rec.metric("log_norm")["a"])
