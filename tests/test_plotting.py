"""Figures: returned objects, the artists they carry, PNG output, and no pyplot global state."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis import synthetic
from ww_monitor.analysis.phases import Phase
from ww_monitor.outputs.plotting import PHASE_COLORS, plot_alpha_per_layer, plot_esd, plot_phase_heatmap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    model = nn.Sequential(nn.Linear(200, 400), nn.Linear(400, 300), nn.Linear(300, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(synthetic.heavy_tailed(400, 200, mu=2.0, seed=0)))
        model[1].weight.copy_(torch.from_numpy(synthetic.graded_spikes(300, 400, 3, seed=0)))
    return wwm.analyze(model, min_evals=8)


def _legend_texts(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plot_esd_draws_histogram_mp_and_power_law(report, tmp_path):
    layer = report["0"]
    fig = plot_esd(layer)
    assert isinstance(fig, Figure)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert len(ax.patches) > 5  # histogram bars
    texts = " ".join(_legend_texts(ax))
    assert "MP" in texts and "power law" in texts and "lambda_+" in texts
    labels = [l.get_label() for l in ax.get_lines()]
    assert any(l.startswith("MP") for l in labels) and any(l.startswith("power law") for l in labels)
    # The MP curve lives on [lambda_-, lambda_+]; the power law starts at xmin.
    mp_line = next(l for l in ax.get_lines() if l.get_label().startswith("MP"))
    assert mp_line.get_xdata().max() == pytest.approx(layer.lambda_plus)
    pl_line = next(l for l in ax.get_lines() if l.get_label().startswith("power law"))
    assert pl_line.get_xdata().min() == pytest.approx(layer.xmin)
    # Issue 10: the title says how much the fit rests on.
    assert ax.get_title() == f"0: 200 eigenvalues, {layer.num_pl_spikes} in the tail"
    path = tmp_path / "esd.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_esd_into_given_axes(report):
    fig = Figure()
    axes = fig.subplots(1, 2)
    out = plot_esd(report["1"], ax=axes[1])
    assert out is fig and len(axes[1].patches) > 0 and len(axes[0].patches) == 0


def test_plot_esd_without_fits_or_eigenvalues(report):
    layer = report["2"]
    import dataclasses

    bare = dataclasses.replace(layer, mp_sigma=math.nan, lambda_plus=math.nan, alpha=math.nan, xmin=math.nan)
    bare.eigenvalues = layer.eigenvalues
    ax = plot_esd(bare).axes[0]
    assert ax.get_lines() == [] and len(ax.patches) > 0
    bare.eigenvalues = None
    with pytest.raises(ValueError, match="keep_eigenvalues"):
        plot_esd(bare)


def test_plot_alpha_per_layer(report, tmp_path):
    import dataclasses

    layers = list(report.layers) + [dataclasses.replace(report.layers[0], name="failed", alpha=math.nan)]
    fig = plot_alpha_per_layer(layers)
    (ax,) = fig.axes
    names = [t.get_text() for t in ax.get_xticklabels()]
    # Issue 10: each label carries the eigenvalue and tail counts; unreliable fits are a second, grey bar set.
    assert names == [f"{l.name} ({l.num_evals}/{l.num_pl_spikes})" for l in layers]
    bars = [p for p in ax.patches if p.get_label() != "$\\alpha \\in [2, 4]$"]
    heights = sorted(p.get_height() for c in ax.containers for p in c)
    assert heights == sorted(l.alpha for l in report.layers if math.isfinite(l.alpha))
    assert sorted(p.get_height() for p in ax.containers[0]) == sorted(
        l.alpha for l in report.layers if math.isfinite(l.alpha) and l.reliable)
    assert not report["2"].reliable and report["2"].phase is None  # the 10-eigenvalue head
    assert len(bars) >= len(heights)
    band = [p for p in ax.patches if "[2, 4]" in p.get_label()]
    assert len(band) == 1
    span = band[0]  # a Rectangle in matplotlib >= 3.9, a Polygon before
    if hasattr(span, "get_height"):
        lo, hi = span.get_y(), span.get_y() + span.get_height()
    else:
        ys = span.get_xy()[:, 1]
        lo, hi = ys.min(), ys.max()
    assert (lo, hi) == (pytest.approx(2.0), pytest.approx(4.0))
    assert any("fit failed" in t for t in _legend_texts(ax))
    fig.savefig(tmp_path / "alpha.png")
    assert (tmp_path / "alpha.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_phase_heatmap(tmp_path):
    names = ["a", "b", "c"]
    steps = [0, 100, 200, 300]
    grid = [
        [Phase.RANDOM_LIKE, Phase.BLEEDING_OUT, Phase.BULK_PLUS_SPIKES, Phase.HEAVY_TAILED],
        [Phase.RANDOM_LIKE, None, "bulk-decay", Phase.BULK_DECAY],
        [Phase.RANK_COLLAPSE] * 4,
    ]
    fig = plot_phase_heatmap(names, steps, grid)
    (ax,) = fig.axes
    (img,) = ax.images
    assert isinstance(img, AxesImage)
    data = img.get_array()
    assert data.shape == (3, 4)
    assert data[1, 1] == 0  # missing
    assert data[0, 0] != data[0, 3] and data[2, 0] == data[2, 3]
    # Each cell's colour is its phase's fixed colour.
    rgba = img.to_rgba(data)
    from matplotlib.colors import to_rgba

    assert tuple(rgba[0, 3]) == pytest.approx(to_rgba(PHASE_COLORS[Phase.HEAVY_TAILED]))
    assert tuple(rgba[2, 1]) == pytest.approx(to_rgba(PHASE_COLORS[Phase.RANK_COLLAPSE]))
    legend = _legend_texts(ax)
    assert [p.value for p in Phase] == legend[:6] and legend[6] == "not analysed"
    assert [t.get_text() for t in ax.get_yticklabels()] == names
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "100", "200", "300"]
    fig.savefig(tmp_path / "phases.png")
    assert (tmp_path / "phases.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_phase_heatmap_checks_shape():
    with pytest.raises(ValueError):
        plot_phase_heatmap(["a"], [0, 1], [[Phase.RANDOM_LIKE]])
    with pytest.raises(ValueError):
        plot_phase_heatmap(["a", "b"], [0], [[Phase.RANDOM_LIKE]])


def test_no_pyplot_and_no_backend_change():
    # Read the raw rcParam: matplotlib.get_backend() itself may import pyplot to resolve "auto".
    code = (
        "import matplotlib, sys; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend');"
        "before = raw();"
        "import ww_monitor.outputs.plotting as p; import numpy as np;"
        "from ww_monitor.analysis.phases import Phase;"
        "fig = p.plot_phase_heatmap(['a'], [0], [[Phase.RANDOM_LIKE]]);"
        "import io; fig.savefig(io.BytesIO(), format='png');"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
        "assert raw() == before"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
