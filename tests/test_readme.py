"""The README's three front-door snippets run as printed, with real components: a Lightning
``Trainer`` on the quickstart's digits model, a ``transformers.Trainer`` on a tiny BERT, and a
plain loop; each writes the spectra to a TensorBoard event file that is read back. The names a
snippet leaves to the reader (``model``, ``dm``, ``ds``, ``loader`` ...) are supplied here; the
Lightning run is capped at 2 epochs (the snippet trains to Lightning's default length)."""

import functools
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def snippets():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 3, "the README shows three front-door snippets"
    return blocks


def scalar_tags(logdir: Path) -> set:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def test_lightning_snippet(tmp_path, monkeypatch):
    pl = pytest.importorskip("pytorch_lightning")
    quickstart = runpy.run_path(str(ROOT / "examples" / "quickstart.py"))
    pytest.importorskip("sklearn")
    train, val = quickstart["digits_loaders"]()
    dm = pl.LightningDataModule.from_datasets(train.dataset, val.dataset, batch_size=64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "Trainer", functools.partial(pl.Trainer, max_epochs=2, enable_progress_bar=False,
                                                         enable_checkpointing=False))
    torch.manual_seed(0)
    namespace = {"model": quickstart["make_model"](pl), "dm": dm}
    exec(snippets()[0], namespace)
    assert namespace["trainer"].current_epoch == 2
    tags = scalar_tags(tmp_path / "tb_logs")
    assert "ww/summary/alpha" in tags and any(t.startswith("ww/alpha/") for t in tags)


def test_huggingface_snippet(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from test_huggingface import Synthetic, tiny_bert

    monkeypatch.chdir(tmp_path)
    namespace = {"Trainer": transformers.Trainer, "TrainingArguments": transformers.TrainingArguments,
                 "model": tiny_bert(), "ds": Synthetic()}
    exec(snippets()[1], namespace)
    namespace["trainer"].train()
    assert any(t.startswith("ww/alpha/") for t in scalar_tags(tmp_path / "out"))


def test_plain_loop_snippet(tmp_path, monkeypatch):
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    import ww_monitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.utils.data.TensorDataset(torch.randn(256, 32), torch.randint(0, 10, (256,)))

    def train_step(batch):
        x, y = batch
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()

    monkeypatch.chdir(tmp_path)
    namespace = {"ww_monitor": ww_monitor, "SummaryWriter": SummaryWriter, "model": model, "train_step": train_step,
                 "loader": torch.utils.data.DataLoader(data, batch_size=32)}
    exec(snippets()[2], namespace)
    monitor = namespace["monitor"]
    assert [r.step for r in monitor.history] == [1, 8]  # the first step (baseline) and the final snapshot at close
    assert "ww/summary/alpha" in scalar_tags(tmp_path / "tb_logs")
