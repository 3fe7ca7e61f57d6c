"""Every example runs in reduced form: the quickstart as a real subprocess, the sweep in-process.

``examples/train_cli.py`` runs with each config in ``tests/test_configs.py``.
:func:`run_quickstart` is shared with ``tests/test_tensorboard_server.py`` (one run per session).
"""

import csv
import importlib.util
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
if importlib.util.find_spec("pytorch_lightning") is None:  # (no import: it is slow)
    pytest.skip("pytorch_lightning is not installed", allow_module_level=True)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


_QUICKSTART: dict = {}


def run_quickstart(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """``examples/quickstart.py --epochs 1`` into a fresh log folder (once per session)."""
    key = id(tmp_path_factory)
    if key not in _QUICKSTART:
        logdir = tmp_path_factory.mktemp("quickstart")
        _QUICKSTART[key] = run_example("quickstart.py", "--logdir", logdir, "--epochs", 1, cwd=logdir), logdir
    return _QUICKSTART[key]


def test_quickstart(tmp_path_factory):
    res, logdir = run_quickstart(tmp_path_factory)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Per-layer summary at step" in res.stdout and "2 snapshots in" in res.stdout
    # The printed command points at the logger's root, so the run is listed by name (not as ".").
    assert f"tensorboard --logdir {logdir}" in res.stdout and "run 'digits/version_0'" in res.stdout
    for layer in ("fc1", "fc2", "out"):
        assert any(line.startswith(layer) for line in res.stdout.splitlines())
    assert list(logdir.rglob("events.out.tfevents*"))


def test_sweep_quick(tmp_path, capsys):
    """In-process (``main(argv)``): the sweep trains plain torch models, no Lightning state."""
    pytest.importorskip("scipy")
    sweep = runpy.run_path(str(EXAMPLES / "sweep.py"))
    returned = sweep["main"](["--quick", "--epochs", "1", "--out", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert len(returned) == 4
    with open(tmp_path / "out" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert {"batch_size", "lr", "weight_decay", "test_acc", "alpha", "alpha_weighted"} <= set(rows[0])
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    assert (tmp_path / "out" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "Spearman" in stdout
