"""Views that scale with depth, read back from the real event files of a 48-layer model.

A deep MLP (24 residual blocks of two 64-wide Linears = 48 analysed layers, plus a head) trains
3 epochs on CPU with a real Lightning Trainer, WeightWatcherCallback and a TensorBoardLogger;
the tests read the alpha/phase heatmap images, the per-block and per-kind scalars and the
custom-scalars layout back from the event files, and render the HTML report of the run.
"""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("pytorch_lightning")
pytest.importorskip("tensorboard")

from test_callback import ClassifierSteps, read_events  # noqa: E402

NUM_BLOCKS = 24
WIDTH = 64  # 64 eigenvalues per layer: above the reliability floor of 50, so fits count
EPOCHS = 2


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.fc2 = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return x + 0.1 * self.fc2(torch.relu(self.fc1(x)))


class DeepMLP(ClassifierSteps, pl.LightningModule):
    def __init__(self, num_blocks: int = NUM_BLOCKS):
        super().__init__()
        self.blocks = nn.Sequential(*(Block() for _ in range(num_blocks)))
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, x):
        return self.head(self.blocks(x))


LAYERS = [f"blocks.{i}.fc{j}" for i in range(NUM_BLOCKS) for j in (1, 2)]


def train(logdir, name: str, seed: int, num_blocks: int = NUM_BLOCKS, figures: bool = True):
    from ww_monitor import WeightWatcherCallback

    torch.manual_seed(seed)
    x = torch.randn(256, WIDTH)
    y = (x[:, :4].argmax(dim=1))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    ww = WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=1 if figures else 0,
                               figures_min_run_seconds=0,
                               max_figure_layers=1,
                               min_evals=8)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, callbacks=[ww],
                         logger=pl.loggers.TensorBoardLogger(str(logdir), name=name), enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(DeepMLP(num_blocks), loader, loader)
    return ww, trainer.logger.log_dir


@pytest.fixture(scope="module")
def deep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    train(root, "small", seed=1, num_blocks=3, figures=False)  # a second run in the folder
    ww, log_dir = train(root, "deep", seed=0)
    return root, ww, log_dir


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_heatmap_images_block_and_kind_scalars_read_back(deep_run):
    _root, ww, log_dir = deep_run
    acc = read_events(log_dir)
    tags = acc.Tags()
    steps = ww.history.steps
    assert len(steps) == EPOCHS + 1  # baseline, one per epoch (the last is the final one)
    # one heatmap image per snapshot, alpha and phase, tall enough to give each of 48 rows pixels
    for tag in ("ww/plots/alpha_heatmap", "ww/plots/phases"):
        events = acc.Images(tag)
        assert [e.step for e in events] == steps, tag
        img = decode_png(events[-1].encoded_image_string)
        assert img.shape[0] >= 48 * 15 and img.std() > 10  # not blank
    # mean alpha per block and per kind: the mean of the block's reliable layers in the history
    last = ww.history[-1]
    alpha, reliable = last.metric("alpha"), last.metric("reliable")
    for i in (0, 11, 23):
        block = f"blocks.{i}"
        values = [e.value for e in acc.Scalars(f"ww_by_block/alpha/{block}")]
        assert len(values) == len(steps)
        layers = [f"{block}.fc1", f"{block}.fc2"]
        chosen = [alpha[l] for l in layers if reliable[l] > 0.5 and math.isfinite(alpha[l])] or \
            [alpha[l] for l in layers if math.isfinite(alpha[l])]
        assert values[-1] == pytest.approx(float(np.mean(chosen)), rel=1e-5)
    kinds = [t for t in tags["scalars"] if t.startswith("ww_by_kind/alpha/")]
    assert kinds == ["ww_by_kind/alpha/linear"]
    per_layer = [alpha[l] for l in LAYERS if reliable[l] > 0.5 and math.isfinite(alpha[l])]
    assert acc.Scalars(kinds[0])[-1].value == pytest.approx(float(np.mean(per_layer)), rel=1e-5)
    # the per-layer tags stay as they were
    assert {f"ww/alpha/{l}" for l in LAYERS} <= set(tags["scalars"])
    assert {f"ww/esd/{l}" for l in LAYERS} <= set(tags["histograms"])


def test_custom_scalars_layout_one_chart_per_block(deep_run):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    _, _, log_dir = deep_run
    acc = read_events(log_dir)
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    categories = {c.title: c for c in layout.category}
    assert "ww per-layer" not in categories  # 48 lines in one chart cannot be told apart
    assert next(iter(categories)) == "ww overview"
    per_block = categories["ww alpha per block"].chart
    assert [c.title for c in per_block[:2]] == ["alpha blocks.0", "alpha blocks.1"]
    assert len(per_block) == NUM_BLOCKS  # the head was skipped (too small), so no block of its own
    # each chart's regex selects exactly the block's two alpha tags among the logged ones
    import re

    scalar_tags = acc.Tags()["scalars"]
    for chart in per_block:
        (regex,) = chart.multiline.tag
        matched = [t for t in scalar_tags if re.match(regex, t)]
        block = chart.title[len("alpha "):]
        assert matched == [f"ww/alpha/{block}.fc1", f"ww/alpha/{block}.fc2"]


def test_report_of_the_deep_run(deep_run, tmp_path):
    from ww_monitor.outputs.offline_report import load_run, write_report

    root, ww, log_dir = deep_run
    data = load_run(root)
    assert data.source == log_dir  # the most recent run in detail
    # the run's own logged metrics, read from the same event files, beside the model-level series
    assert {"train_loss", "val_loss"} <= set(data.training_scalars)
    assert "epoch" not in data.training_scalars and not any(t.startswith("ww") for t in data.training_scalars)
    steps, values = data.summary_series["alpha"]
    assert steps == ww.history.steps
    assert values == pytest.approx([rec.summary["alpha"] for rec in ww.history], rel=1e-5)
    # both runs of the folder, by name, side by side
    assert set(data.runs) == {"deep/version_0", "small/version_0"}
    assert len(data.runs["small/version_0"][0]) == EPOCHS + 1 and data.runs["deep/version_0"] == (steps, values)
    # every layer of the 48 in the alpha grid, model order, reliable flags from ww/reliable
    assert list(data.alpha) == LAYERS and set(data.reliable) == set(LAYERS)
    out = write_report(root, tmp_path / "report.html")
    page = out.read_text()
    for section in ("summary", "overview", "runs", "alpha", "phases", "esd", "alerts", "layers"):
        assert f'<section id="{section}">' in page, section
    assert page.count('alt="alpha heatmap"') == 1 and 'alt="alpha over training"' not in page  # no spaghetti
    assert "48 layers: one row each in the heatmap" in page
    # the worst layers are named in words, ranked as in the heatmap's title (issue 21: the same
    # ranking, on the same inputs, in TensorBoard and in the report)
    from ww_monitor.outputs.offline_report import _alpha_grid
    from ww_monitor.outputs.worst_layers import WORST_LISTED, worst_layers

    last = ww.history[-1]
    _, (names, tb_steps, alphas, rel) = ww.history.figure_grids(LAYERS)
    tails = [last.metric("num_pl_spikes")[l] for l in names]
    in_tensorboard = worst_layers(names, alphas[:, -1], tails, rel[:, -1] > 0.5, count=WORST_LISTED)
    r_names, r_steps, r_alphas, r_rel, r_tails = _alpha_grid(data)
    in_report = worst_layers(r_names, r_alphas[:, -1], r_tails, r_rel[:, -1], count=WORST_LISTED)
    assert (r_names, r_steps) == (names, tb_steps)
    assert [(o.name, o.tail) for o in in_report] == [(o.name, o.tail) for o in in_tensorboard]
    assert [o.alpha for o in in_report] == pytest.approx([o.alpha for o in in_tensorboard], rel=1e-6)
    if in_report:
        assert f"Worst at step {steps[-1]}, by standard errors of the fit outside the [2, 4] band" in page
        assert all(f"<code>{o.name}</code> ({o.alpha:.2f}, tail {o.tail})" in page for o in in_report)
    else:
        assert "Every layer with a reliable fit is inside the [2, 4] band" in page
    assert "train_loss" in page and "small/version_0" in page
