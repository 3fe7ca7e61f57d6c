"""``ww-monitor report`` / :mod:`ww_monitor.outputs.offline_report` and ``ww-monitor analyze --plot``.

The inputs are real: a short pytorch_lightning run with the callback (blocking, so the result is
deterministic) writes a TensorBoard log and a checkpoint.
"""

import base64
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ww_monitor.outputs.cli import main, run_analysis
from ww_monitor.outputs.offline_report import load_run

pl = pytest.importorskip("pytorch_lightning")

LAYERS = ["fc1", "fc2"]  # the head (48x4: 4 eigenvalues) is too small and is skipped
ALERT_TEXT = "alpha=1.90 < 2.0 in fc2: very heavy-tailed, possibly over-trained"
SECTIONS = ("summary", "alpha", "phases", "esd", "alerts", "layers")


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)
        self.head = nn.Linear(48, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """TensorBoard logdir, checkpoint and snapshot steps of a 3-epoch run (4 steps per epoch)."""
    from ww_monitor import WeightWatcherCallback

    root = tmp_path_factory.mktemp("run")
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)),
                      batch_size=16)
    torch.manual_seed(0)
    # Layers under 50 eigenvalues (unreliable since issue 10) are averaged anyway, so the summary has values.
    ww = WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=2, max_figure_layers=2,
                               summary_include_unreliable=True, figures_min_run_seconds=0, figures_timeout=300)
    logger = pl.loggers.TensorBoardLogger(str(root / "tb"), name="tiny")
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=logger, callbacks=[ww],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=1)
    trainer.fit(Tiny(), data)
    ckpt = root / "final.ckpt"
    trainer.save_checkpoint(str(ckpt))
    # What the alert wiring will log (alerts as text under ww/alerts).
    logger.experiment.add_text("ww/alerts", ALERT_TEXT, global_step=ww.history.steps[-1])
    logger.experiment.flush()
    plain = root / "weights.pt"
    torch.save(trainer.lightning_module.state_dict(), plain)
    return {"logdir": root / "tb", "ckpt": ckpt, "plain": plain, "steps": ww.history.steps, "history": ww.history}


def images(page):
    found = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    for b64 in found:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    return found


def assert_self_contained(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert not re.search(r'(src|href)="(https?:)?//', page)  # no external assets
    assert "<script" not in page and "<link" not in page


def report(args, capsys):
    rc = main(["report", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_report_from_tensorboard_logdir(run, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    rc, stdout, stderr = report([run["logdir"], "--out", out], capsys)
    assert rc == 0, stderr
    assert str(out) in stdout
    page = out.read_text()
    assert_self_contained(page)
    assert "TensorBoard log" in page
    assert 'alt="alpha over training"' in page and 'alt="phase heatmap"' in page
    for layer in LAYERS:
        assert f'alt="ESD evolution {layer}"' in page
        assert f'<td class="l">{layer}</td>' in page  # summary table row
    assert ALERT_TEXT.replace("<", "&lt;") in page  # alerts from the ww/alerts text
    # Issue 21: the callback's ESD figures (with fits) sit in the ESD section; the figures the report
    # redraws from the scalars (alpha heatmap, phases, alpha per layer) are not embedded a second time.
    assert 'alt="ww/plots/esd/' in page and 'id="logged-figures"' not in page
    assert "ww/plots/alpha_heatmap" not in page and "ww/plots/phases" not in page
    assert len(images(page)) >= 5


def test_tensorboard_data_matches_the_run(run):
    data = load_run(run["logdir"])
    assert list(data.alpha) == LAYERS
    h = run["history"]
    for layer in LAYERS:
        steps, values = data.alpha[layer]
        assert steps == run["steps"]
        assert values == pytest.approx([r.metric("alpha")[layer] for r in h], rel=1e-6)
        assert [s.step for s in data.esd_evolution[layer]] == run["steps"]
    names, steps, grid = data.phases
    assert (names, steps) == h.phases(LAYERS)[:2]
    assert grid == h.phases(LAYERS)[2]
    assert data.table_step == run["steps"][-1]
    assert data.summary["alpha"] == pytest.approx(h[-1].summary["alpha"], rel=1e-6)
    assert data.alerts == [{"step": run["steps"][-1], "text": ALERT_TEXT}]
    # one event file works too
    event_file = sorted(run["logdir"].rglob("events.out.tfevents*"))[0]  # the training one (a second holds the alert)
    assert list(load_run(event_file).alpha) == LAYERS
    # ESD evolution: at most max_esd_snapshots overlays, first and last kept
    few = load_run(run["logdir"], max_esd_layers=1, max_esd_snapshots=2)
    assert len(few.esd_evolution) == 1
    assert [s.step for s in next(iter(few.esd_evolution.values()))] == [run["steps"][0], run["steps"][-1]]
    assert list(load_run(run["logdir"], esd_layers=[r"fc2$"]).esd_evolution) == ["fc2"]


def test_report_from_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "ckpt.html"
    rc, _stdout, stderr = report([run["ckpt"], "--out", out, "--max-esd-layers", "1"], capsys)
    assert rc == 0, stderr
    page = out.read_text()
    assert_self_contained(page)
    assert "checkpoint with WeightWatcherCallback history" in page
    assert 'alt="alpha over training"' in page and 'alt="phase heatmap"' in page
    assert page.count('alt="ESD ') == 1  # final weights, with fits
    assert "replayed over the checkpoint" in page
    assert "head" in page and "min_evals" in page  # skipped layer and why
    data = load_run(run["ckpt"])
    assert data.source_kind == "checkpoint" and data.num_snapshots == len(run["steps"])
    assert data.alpha["fc1"][0] == run["steps"]
    assert data.table_step == run["steps"][-1]
    assert [r["layer"] for r in data.table] == LAYERS
    assert {r.name for r in data.esd_results} <= set(LAYERS) and data.esd_results[0].eigenvalues is not None


def test_report_from_plain_weights(run, tmp_path, capsys):
    out = tmp_path / "plain.html"
    rc, _, stderr = report([run["plain"], "--out", out], capsys)
    assert rc == 0, stderr
    page = out.read_text()
    assert_self_contained(page)
    assert "model weights (single analysis)" in page and 'alt="alpha per layer"' in page
    assert len(images(page)) == 2 + len(LAYERS)  # alpha per layer, phases, one ESD per layer


def test_report_errors(tmp_path, capsys):
    """One line on stderr, exit status 2 (``main`` is what the console script runs)."""
    from torch.utils.tensorboard import SummaryWriter

    rc, _, err = report([tmp_path / "missing"], capsys)
    assert rc == 2 and "no such file or directory" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = report([tmp_path / "empty"], capsys)
    assert rc == 2 and "no TensorBoard event files" in err
    w = SummaryWriter(str(tmp_path / "other"))
    w.add_scalar("loss", 1.0, 0)
    w.close()
    rc, _, err = report([tmp_path / "other", "--out", tmp_path / "x.html"], capsys)
    assert rc == 2 and "no ww/ tags" in err and not (tmp_path / "x.html").exists()
    rc, _, err = report([tmp_path / "other", "--esd-layers", "fc("], capsys)
    assert rc == 2 and "invalid layer regex" in err
    assert err.count("\n") == 1 and err.startswith("ww-monitor: error:")


def test_analyze_plot(run, tmp_path, capsys):
    rc = main(["analyze", str(run["plain"]), "--format", "json", "--plot", str(tmp_path / "figs"), "--max-plots", "1"])
    captured = capsys.readouterr()
    assert rc == 0
    assert [l["name"] for l in json.loads(captured.out)["layers"]] == LAYERS  # stdout stays parseable
    assert "wrote 2 figure(s)" in captured.err
    files = sorted(p.name for p in (tmp_path / "figs").iterdir())
    # Issue 21: the ESD figure goes to the worst layer (by the report's ranking), else the first.
    from ww_monitor.outputs.worst_layers import choose_figure_layers

    rows = json.loads(captured.out)["layers"]
    (chosen,) = choose_figure_layers([l["name"] for l in rows], None, 1, [l["alpha"] for l in rows],
                                     [l["num_pl_spikes"] for l in rows], [l["reliable"] for l in rows])
    assert files == ["alpha_per_layer.png", f"esd_{chosen}.png"]
    assert (tmp_path / "figs" / f"esd_{chosen}.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", str(run["plain"]), "--plot", str(tmp_path / "none"), "--max-plots", "0"]) == 0
    assert [p.name for p in (tmp_path / "none").iterdir()] == ["alpha_per_layer.png"]
    capsys.readouterr()


def test_progress_path_gives_the_same_results(run, capsys):
    import ww_monitor as wwm

    plain = wwm.analyze(run["plain"])
    assert main(["analyze", str(run["plain"])]) == 0  # stderr is no terminal here: no bar
    assert capsys.readouterr().err == ""
    shown = run_analysis(run["plain"], progress=True)
    assert "analysing" in capsys.readouterr().err
    assert [l.name for l in shown.layers] == [l.name for l in plain.layers]
    assert [l.alpha for l in shown.layers] == [l.alpha for l in plain.layers]
    assert [s.name for s in shown.skipped] == [s.name for s in plain.skipped]


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_only_on_a_terminal(run):
    import fcntl
    import pty
    import select
    import struct
    import termios

    cmd = [sys.executable, "-m", "ww_monitor", "analyze", str(run["plain"])]
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the whole table, not fitted to a width
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    err = b""
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end closed
                break
            if not chunk:
                break
            err += chunk
    finally:
        os.close(master)
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert b"analysing" in err and b"layer" in err
    assert proc.stdout.read().decode().splitlines()[0].split()[:2] == ["name", "kind"]
