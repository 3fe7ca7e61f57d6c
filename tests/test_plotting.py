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
from ww_monitor.outputs.plotting import (
    ALPHA_GOOD_BAND,
    PHASE_COLORS,
    plot_alpha_per_layer,
    plot_esd,
    plot_phase_heatmap,
)

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

    from matplotlib.colors import to_rgba

    from ww_monitor.outputs.alpha_figures import BAND_COLORS

    far = dataclasses.replace(report.layers[0], name="far", alpha=14.0)  # beyond the axis (10)
    layers = [*list(report.layers), far, dataclasses.replace(report.layers[0], name="failed", alpha=math.nan)]
    fig = plot_alpha_per_layer(layers, step=7)
    (ax,) = fig.axes
    # Issue 21: one horizontal bar per layer, first layer on top, every row labelled by its name.
    assert [t.get_text() for t in ax.get_yticklabels()] == [l.name for l in layers]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]
    # Issue 10: each bar is annotated with alpha and the eigenvalue / tail counts it rests on.
    notes = [t.get_text() for t in ax.texts]
    for l in layers[:-1]:
        assert f"{l.alpha:.2f} ({l.num_evals}/{l.num_pl_spikes})" in notes
    assert f"fit failed ({layers[-1].num_evals}/{layers[-1].num_pl_spikes})" in notes
    bars = [p for c in ax.containers for p in c]
    # bars end at alpha = 10 at most; a longer one ends in a ">" with its value written beside it
    assert sorted(p.get_width() for p in bars) == pytest.approx(
        sorted(min(l.alpha, 10.0) for l in layers if math.isfinite(l.alpha)))
    beyond = [l for l in layers if l.alpha > 10.0]
    assert len([ln for ln in ax.get_lines() if ln.get_marker() == ">"]) == len(beyond) >= 1
    # colour by side of the band; unreliable fits white and hatched
    lo, hi = ALPHA_GOOD_BAND
    for p in ax.containers[0]:
        a = p.get_width()  # 10 for a bar cut at the axis: above the band either way
        side = "below" if a < lo else "above" if a > hi else "inside"
        assert p.get_facecolor() == pytest.approx(to_rgba(BAND_COLORS[side]))
    assert not report["2"].reliable and report["2"].phase is None  # the 10-eigenvalue head
    (unsure,) = ax.containers[1]
    assert unsure.get_hatch() == "///" and unsure.get_facecolor() == pytest.approx(to_rgba("white"))
    # the band is shaded on the alpha axis; the key is a figure legend beside the axes, not on the bars
    (band,) = [p for p in ax.patches if p not in bars]
    xs = band.get_xy()[:, 0] if not hasattr(band, "get_width") else [band.get_x(), band.get_x() + band.get_width()]
    assert (min(xs), max(xs)) == (pytest.approx(lo), pytest.approx(hi))
    assert ax.get_legend() is None and len(fig.legends) == 1
    assert "at step 7" in ax.get_title()
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
    # Issue 21: the key says what each phase means (which are healthy) and sits beside the map
    assert [t.split(":")[0] for t in legend[:6]] == [p.value for p in Phase] and legend[6] == "not analysed"
    assert "healthy" in legend[3] and "healthy" in legend[4] and "problem" in legend[5]
    assert "phase per layer" in ax.get_title() and "heavy-tailed" in ax.get_title()
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
