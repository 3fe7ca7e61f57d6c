"""``ww_monitor.Monitor`` in a plain PyTorch loop: real SummaryWriter event files read back."""

import pytest
import torch
from torch import nn

import ww_monitor
from ww_monitor.errors import WWMonitorError

pytestmark = pytest.mark.filterwarnings("ignore:.*(no logger|not analysed|figures).*:RuntimeWarning")

STEPS, EVERY = 12, 5
LAYERS = ["0", "2"]  # the two Linears big enough to analyse; the head (4 eigenvalues) is skipped


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 4))


def train(monitor, model, steps=STEPS, start=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(start)
    for step in range(start, start + steps):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        if monitor.step(model, step):
            break
    return step


def read_events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_summary_writer_gets_the_callback_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    model = make_model()
    monitor = ww_monitor.Monitor(writer, every_n_steps=EVERY, blocking=True, figures_every_n_snapshots=None,
                                 summary_include_unreliable=True)
    last = train(monitor, model)
    monitor.close(model, last)
    writer.close()
    # The baseline at the first call (step 1), every 5 steps, the final one at close.
    assert monitor.history.steps == [1, 5, 10, 12]
    acc = read_events(tmp_path / "tb")
    tags = acc.Tags()
    for layer in LAYERS:
        assert [e.step for e in acc.Scalars(f"ww/alpha/{layer}")] == monitor.history.steps
        assert [e.step for e in acc.Histograms(f"ww/esd/{layer}")] == monitor.history.steps
        alpha = monitor.history.to_pandas().query("name == @layer").alpha.tolist()
        assert [e.value for e in acc.Scalars(f"ww/alpha/{layer}")] == pytest.approx(alpha, rel=1e-6)
    assert "ww/summary/alpha" in tags["scalars"]
    assert "ww/alpha/4" not in tags["scalars"]
    assert set(monitor.metrics) >= {f"ww/alpha/{n}" for n in LAYERS}


def test_callable_sink_and_resume_without_gaps(tmp_path):
    seen = []
    model = make_model()
    monitor = ww_monitor.Monitor(lambda metrics, step: seen.append((step, metrics)), every_n_steps=EVERY,
                                 blocking=True, figures_every_n_snapshots=None)
    train(monitor, model, steps=7)  # steps 1..7: snapshots at 1 and 5
    state = monitor.state_dict()
    path = tmp_path / "monitor.pt"
    torch.save(state, path)
    monitor.close()  # without a model: no final snapshot

    resumed = ww_monitor.Monitor(lambda metrics, step: seen.append((step, metrics)), every_n_steps=EVERY,
                                 blocking=True, figures_every_n_snapshots=None)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    last = train(resumed, model, steps=8, start=8)  # steps 8..15: snapshot at 10 and 15
    resumed.close(model, last)
    assert resumed.history.steps == [1, 5, 10, 15]
    logged = sorted({step for step, metrics in seen if any(k.startswith("ww/alpha/") for k in metrics)})
    assert logged == [1, 5, 10, 15]


def test_stop_alert_is_returned_by_step():
    from ww_monitor.monitoring.alerts import AlertConfig

    model = make_model()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # a non-finite layer from the first snapshot on
    stop = AlertConfig(actions={"non_finite": ("log", "stop")})
    monitor = ww_monitor.Monitor(every_n_steps=EVERY, blocking=True, alerts=stop, figures_every_n_snapshots=None)
    assert monitor.step(model, 1) is True
    assert monitor.should_stop
    monitor.close()


def test_warnings_name_the_front_door():
    monitor = ww_monitor.Monitor(every_n_steps=EVERY, blocking=True, figures_every_n_snapshots=None)
    with pytest.warns(RuntimeWarning, match=r"^Monitor: no logger or sink; .* as `sinks`"):
        monitor.step(make_model(), 1)
    monitor.close()


def test_bad_arguments_are_named():
    with pytest.raises(WWMonitorError, match="every_n_steps"):
        ww_monitor.Monitor(every_n_steps=0)
    with pytest.raises(WWMonitorError, match=r"every_n_epochs.*every_n_steps"):
        ww_monitor.Monitor(every_n_epochs=1)
    with pytest.raises(WWMonitorError, match="sinks"):
        ww_monitor.Monitor(sinks=42)
    with pytest.raises(WWMonitorError, match="model"):
        ww_monitor.Monitor().step("not a model", 1)


def test_plain_loop_example(tmp_path, capsys):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"))
    monitor = example["main"](["--logdir", str(tmp_path / "tb"), "--steps", "12", "--every", "5", "--on-lag", "wait",
                                "--every-snapshot"])
    assert monitor.history.steps == [1, 5, 10, 12]
    assert "4 snapshots" in capsys.readouterr().out
    assert list((tmp_path / "tb").glob("events.out.tfevents*"))
