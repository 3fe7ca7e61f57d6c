"""The layer figures stay legible at 44 and at 200 layers (issue 21), checked on the drawn artists.

Each figure is drawn with the Agg canvas and its text read back through matplotlib's bounding
boxes (``get_window_extent``): every layer row labelled with its displayed name at a readable
font size, no two tick labels overlapping, titles and keys clear of the tick labels, keys beside
the data (not on it), nothing outside the image. Names are those of a LLaMA inside a
LightningModule (``model.model.layers.N...``, ``model.lm_head``): 6 blocks = 44 matrices, 28
blocks = 198.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ww_monitor.analysis.phases import Phase
from ww_monitor.analysis.results import LayerResult
from ww_monitor.outputs.figure_layout import MIN_LABEL_FONT
from ww_monitor.outputs.plotting import plot_alpha_heatmap, plot_alpha_per_layer, plot_phase_heatmap

STEPS = [0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320]
#: Pixels two boxes may share and still count as apart (anti-aliasing of adjacent glyph boxes).
TOLERANCE = 0.5


def llama_names(blocks: int) -> list[str]:
    names = ["model.model.embed_tokens"]
    for i in range(blocks):
        names += [f"model.model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return [*names, "model.lm_head"]


def overlap(a, b) -> bool:
    return (min(a.x1, b.x1) - max(a.x0, b.x0) > TOLERANCE) and (min(a.y1, b.y1) - max(a.y0, b.y0) > TOLERANCE)


def drawn(fig):
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def texts(items, renderer):
    return [(t, t.get_window_extent(renderer)) for t in items if t.get_visible() and t.get_text().strip()]


def assert_apart(boxes, what):
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        assert not overlap(a, b), f"{what}: {ta.get_text()!r} overlaps {tb.get_text()!r}"


def ticks(ax, axis: str):
    """The tick labels matplotlib draws (those within the axis' limits)."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    lo, hi = sorted(a.get_view_interval())
    return [t for t, loc in zip(a.get_ticklabels(), a.get_ticklocs()) if lo - 1e-9 <= loc <= hi + 1e-9]


def check_layout(fig, ax, names, renderer, key=None):
    """The checks every layer figure passes (see the module docstring)."""
    rows = texts(ticks(ax, "y"), renderer)
    shown = [t.get_text() for t, _ in rows]
    assert len(shown) == len(names), "every layer row is labelled"
    assert shown[0] == "embed_tokens" and shown[-1] == "lm_head" and "layers.0.self_attn.q_proj" in shown
    assert not any(s.startswith("model.") for s in shown), "wrapper prefix left out"
    assert min(t.get_fontsize() for t, _ in rows) >= MIN_LABEL_FONT
    assert_apart(rows, "row labels")
    cols = texts(ticks(ax, "x"), renderer)
    assert_apart(cols, "step labels")
    title = ax.title.get_window_extent(renderer)
    for t, box in rows + cols:
        assert not overlap(title, box), f"title overlaps {t.get_text()!r}"
    width, height = fig.canvas.get_width_height()
    for t, box in rows + cols + [(ax.title, title)]:
        assert box.x0 >= -TOLERANCE and box.y0 >= -TOLERANCE and box.x1 <= width + TOLERANCE and \
            box.y1 <= height + TOLERANCE, f"{t.get_text()[:40]!r} is cut off"
    if key is not None:
        kb = key.get_window_extent(renderer)
        assert not overlap(kb, ax.get_window_extent(renderer)), "the key sits on the data"
        assert not overlap(kb, title)
        for t, box in rows + cols:
            assert not overlap(kb, box), f"the key overlaps {t.get_text()!r}"
        assert kb.x0 >= -TOLERANCE and kb.y0 >= -TOLERANCE and kb.x1 <= width + TOLERANCE
    return rows


@pytest.fixture(params=[6, 28], ids=["44 layers", "198 layers"])
def run(request):
    names = llama_names(request.param)
    rng = np.random.default_rng(request.param)
    alphas = rng.uniform(1.5, 6.0, (len(names), len(STEPS)))
    alphas[3, -1] = 14.0  # off the axis
    tails = rng.integers(5, 90, len(names))
    reliable = np.ones_like(alphas, dtype=bool)
    reliable[tails < 10, -1] = False
    return names, alphas, tails, reliable


def test_alpha_per_layer_scales(run):
    names, alphas, tails, reliable = run
    layers = [LayerResult(name=n, kind="linear", N=344, M=128, Q=2.7, num_evals=128, alpha=float(alphas[i, -1]),
                          num_pl_spikes=int(tails[i]), reliable=bool(reliable[i, -1]), fit_ok=True)
              for i, n in enumerate(names)]
    fig = plot_alpha_per_layer(layers, step=STEPS[-1])
    (ax,) = fig.axes
    renderer = drawn(fig)
    rows = check_layout(fig, ax, names, renderer, key=fig.legends[0])
    # the image grows with the layer count (one row each), and each row's value is readable
    assert fig.get_figheight() >= 0.1 * len(names)
    notes = texts(ax.texts, renderer)
    assert len(notes) == len(names) and min(t.get_fontsize() for t, _ in notes) >= MIN_LABEL_FONT
    assert_apart(notes, "bar values")
    for (_t, box), (_, label) in zip(notes, rows):
        assert not overlap(box, label)


def test_alpha_heatmap_scales(run):
    names, alphas, tails, reliable = run
    fig = plot_alpha_heatmap(names, STEPS, alphas, reliable, tails=tails)
    ax, cbar = fig.axes
    renderer = drawn(fig)
    check_layout(fig, ax, names, renderer)
    cbar_box = cbar.get_window_extent(renderer)
    assert not overlap(ax.title.get_window_extent(renderer), cbar_box)
    # block separators between the transformer blocks (and around embed_tokens / lm_head)
    separators = [ln for ln in ax.get_lines() if ln.get_linestyle() == "-" and len(set(ln.get_ydata())) == 1]
    assert len(separators) == (len(names) - 2) // 7 + 1
    assert "worst at step 320" in ax.get_title() and "tail" in ax.get_title()


def test_phase_heatmap_scales(run):
    names, *_ = run
    rng = np.random.default_rng(len(names))
    order = list(Phase)
    phases = [[order[rng.integers(0, len(order))] for _ in STEPS] for _ in names]
    phases[1][0] = None
    phases[2][1] = "undetermined"
    fig = plot_phase_heatmap(names, STEPS, phases)
    (ax,) = fig.axes
    renderer = drawn(fig)
    check_layout(fig, ax, names, renderer, key=ax.get_legend())
    assert_apart(texts(ax.get_legend().get_texts(), renderer), "key entries")
