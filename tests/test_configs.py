"""The LightningCLI configs in ``configs/`` with ``examples/train_cli.py``.

Every config runs for two steps as ``python examples/train_cli.py fit --config configs/<name>.yaml
--trainer.max_steps=2 --trainer.logger.init_args.save_dir=<tmp> ...``. The three runs share one
subprocess (each is executed as ``__main__`` with its own ``sys.argv``) so that
``pytorch_lightning`` and ``jsonargparse`` are imported once. Then the TensorBoard logs show the
callback ran with each config's settings; and the two early-stopping configs, with a value
tweaked, really stop training on ``ww/summary/alpha``.
"""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("jsonargparse")
pytest.importorskip("sklearn")
pl = pytest.importorskip("pytorch_lightning")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_cli.py"
CONFIGS = ("default", "large_model", "early_stopping", "alpha_drift")

DRIVER = r"""
import json, runpy, sys, traceback
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        results[name] = "ok"
    except SystemExit as exc:
        results[name] = "ok" if exc.code in (0, None) else f"SystemExit({exc.code})"
    except BaseException:
        results[name] = traceback.format_exc()
print("RESULTS=" + json.dumps(results))
"""


def overrides(out: Path) -> list[str]:
    return [
        "--trainer.max_steps=2", "--trainer.num_sanity_val_steps=0",
        f"--trainer.logger.init_args.save_dir={out}", f"--trainer.default_root_dir={out}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
    ]


# These 2-step runs are far shorter than `figures_min_run_seconds` (60 s), so the configs as
# written draw no figures. `default` is told to draw them anyway (figures_min_run_seconds=0);
# in `large_model` they are switched off. This also checks that the YAML's callback stays
# overridable from the command line (jsonargparse applies `callbacks.init_args.*` to the last
# callback of the list, so only the configs where it is last can be overridden).
EXTRA = {"large_model": ["--trainer.callbacks.init_args.figures_every_n_snapshots=0"],
         "default": ["--trainer.callbacks.init_args.figures_min_run_seconds=0",
                     "--trainer.callbacks.init_args.figures_timeout=300"]}
FIGURES = {"default"}  # configs whose run draws figures


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    argv = {name: [str(SCRIPT), "fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), *overrides(root / name),
                   *EXTRA.get(name, [])] for name in CONFIGS}
    res = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv)], capture_output=True, text=True,
                         timeout=400, cwd=root)
    line = next((l for l in res.stdout.splitlines() if l.startswith("RESULTS=")), None)
    assert line is not None, f"driver failed (exit {res.returncode}):\n{res.stderr[-4000:]}"
    return root, json.loads(line[len("RESULTS="):])


def ww_scalars(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {p.parent for p in logdir.rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return [t for t in acc.Tags()["scalars"] if t.startswith("ww/")], acc.Tags()["images"]


@pytest.mark.parametrize("name", CONFIGS)
def test_config_runs_and_the_callback_logs(runs, name):
    root, results = runs
    assert results[name] == "ok", results[name]
    tags, images = ww_scalars(root / name)
    assert "ww/summary/alpha" in tags
    assert bool(images) == (name in FIGURES)  # figures at the final snapshot where the run asks for them
    layers = {t.split("/", 2)[2] for t in tags if t.startswith("ww/alpha/")}
    if name == "large_model":
        assert layers == {"encoder.0", "encoder.2"}  # `exclude: head$` at work
    else:
        assert layers == {"encoder.0", "encoder.2", "head"}


@pytest.mark.parametrize("name", CONFIGS)
def test_config_callback_settings(name):
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    callbacks = cfg["trainer"]["callbacks"]
    assert callbacks[0]["class_path"] == "ww_monitor.WeightWatcherCallback"
    from ww_monitor import WeightWatcherCallback

    WeightWatcherCallback(**callbacks[0]["init_args"])  # every option is a real, valid argument
    if name == "large_model":
        args = callbacks[0]["init_args"]
        assert args["every_n_train_steps"] and args["exclude"] and args["kinds"]
        assert args["figures_every_n_snapshots"] > 10
    if name == "early_stopping":
        assert callbacks[1]["class_path"] == "EarlyStopping"
        assert callbacks[1]["init_args"]["monitor"] == "ww/summary/alpha"
    if name == "alpha_drift":
        from ww_monitor import AlphaDriftEarlyStopping

        assert callbacks[1]["class_path"] == "ww_monitor.AlphaDriftEarlyStopping"
        AlphaDriftEarlyStopping(**callbacks[1]["init_args"])


def fit_tweaked(tmp_path, name: str, stopper_args: dict, max_epochs: int):
    """Run a shipped config with a blocking analysis (each value is there at its epoch end), no
    figures, and the stopper's ``init_args`` updated; returns (trainer, stopper)."""
    cfg = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    ww, stopper_cfg = cfg["trainer"]["callbacks"]
    ww["init_args"].update(blocking=True, figures_every_n_snapshots=None)
    stopper_cfg["init_args"].update(stopper_args)
    tweaked = tmp_path / f"{name}.yaml"
    tweaked.write_text(yaml.safe_dump(cfg))
    main = runpy.run_path(str(SCRIPT))["main"]
    cli = main(["fit", "--config", str(tweaked), f"--trainer.max_epochs={max_epochs}", *overrides(tmp_path)[1:]])
    stopper_type = stopper_cfg["class_path"].rsplit(".", 1)[-1]
    return cli.trainer, next(c for c in cli.trainer.callbacks if type(c).__name__ == stopper_type)


def test_early_stopping_config_stops_on_alpha(tmp_path):
    """Lightning's EarlyStopping with a threshold every model meets stops after one epoch."""
    trainer, stopper = fit_tweaked(tmp_path, "early_stopping", {"stopping_threshold": 100.0}, max_epochs=4)
    assert "ww/summary/alpha" in trainer.callback_metrics
    assert trainer.should_stop and trainer.current_epoch == 1
    assert stopper.stopped_epoch == 0


def test_alpha_drift_config_stops_on_the_floor(tmp_path):
    """AlphaDriftEarlyStopping with a floor every model is under stops once `min_snapshots`
    snapshots were seen."""
    # warmup off: this checks min_snapshots alone (the warm-up has its own tests in test_signals.py).
    trainer, stopper = fit_tweaked(tmp_path, "alpha_drift", {"floor": 100.0, "warmup": False}, max_epochs=10)
    assert trainer.should_stop and "floor" in stopper.stopped_reason
    assert len(stopper.seen_steps) == 3  # the baseline + two epoch ends: min_snapshots
    assert trainer.current_epoch == 2
