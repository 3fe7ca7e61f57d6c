"""The ww-monitor command line, run as a real subprocess."""

import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # the whole table (tests/test_cli_table.py fits it)
    return subprocess.run([sys.executable, "-m", "ww_monitor", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.Conv2d(8, 16, 3), nn.Linear(3, 2))
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    return path


def test_table(ckpt):
    res = run("analyze", ckpt)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["name", "kind", "N", "M"]
    assert [l.split()[0] for l in lines[1:4]] == ["0", "2", "3"]
    assert "skipped 1 layer(s):" in res.stdout and "min_evals" in res.stdout
    assert "summary: alpha=" in res.stdout


def test_csv_and_json_agree(ckpt):
    c = run("analyze", ckpt, "--format", "csv")
    j = run("analyze", ckpt, "--format", "json")
    assert c.returncode == 0 and j.returncode == 0
    rows = list(csv.DictReader(io.StringIO(c.stdout)))
    payload = json.loads(j.stdout)
    assert [r["name"] for r in rows] == [l["name"] for l in payload["layers"]] == ["0", "2", "3"]
    for r, l in zip(rows, payload["layers"]):
        assert float(r["alpha"]) == pytest.approx(l["alpha"], rel=1e-12)
    assert payload["skipped"][0]["name"] == "4"


def test_include_exclude_flags(ckpt):
    res = run("analyze", ckpt, "--format", "json", "--include", r"^[02]$", "--exclude", "^0$")
    assert [l["name"] for l in json.loads(res.stdout)["layers"]] == ["2"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.ckpt", "no such file"),
        (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "unsupported file type"),
        (lambda d: (d / "bad.pt").write_bytes(b"garbage") and d / "bad.pt", "corrupt"),
    ],
)
def test_user_errors_exit_2_without_traceback(tmp_path, setup, message):
    res = run("analyze", setup(tmp_path))
    assert res.returncode == 2
    assert message in res.stderr and res.stderr.startswith("ww-monitor: error:")
    assert "Traceback" not in res.stderr


def test_unsafe_load_flag(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Sequential(nn.Linear(20, 20)), path)
    refused = run("analyze", path)
    assert refused.returncode == 2 and "--unsafe-load" in refused.stderr
    ok = run("analyze", path, "--unsafe-load", "--format", "json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["layers"][0]["name"] == "0"


def test_console_script_is_installed():
    res = subprocess.run(["ww-monitor", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "analyze" in res.stdout


class _Blocks(nn.Module):
    """12 numbered blocks then a head: plain string order would put blocks.10 before blocks.2."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(40, 40) for _ in range(12))
        self.head = nn.Linear(40, 24)


def test_every_format_shares_column_names_and_model_order(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = _Blocks().state_dict()
    model_order = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    assert sorted(model_order) != model_order  # the case that needs the natural order
    torch.save(sd, tmp_path / "model.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    outputs = {}
    for source in ("model.pt", "model.safetensors"):
        for fmt in ("table", "csv", "json"):
            res = run("analyze", tmp_path / source, "--format", fmt)
            assert res.returncode == 0, res.stderr
            outputs[source, fmt] = res.stdout
    for source in ("model.pt", "model.safetensors"):
        csv_rows = list(csv.DictReader(io.StringIO(outputs[source, "csv"])))
        csv_columns = list(csv_rows[0])
        json_layers = json.loads(outputs[source, "json"])["layers"]
        table_lines = outputs[source, "table"].splitlines()
        table_columns = table_lines[0].split()
        # one vocabulary: JSON keys are the CSV columns in the same order; the table shows a
        # subset of them under the same names, in the same relative order
        assert list(json_layers[0]) == csv_columns
        assert [c for c in csv_columns if c in table_columns] == table_columns
        assert {"name", "alpha", "alpha_weighted", "num_pl_spikes", "num_spikes", "phase"} <= set(table_columns)
        # rows in model order in every format, from either file type
        table_names = [line.split()[0] for line in table_lines[1 : 1 + len(model_order)]]
        assert [r["name"] for r in csv_rows] == [l["name"] for l in json_layers] == table_names == model_order
        # the table's cells are the CSV's values
        col = table_columns.index("num_pl_spikes")
        assert [line.split()[col] for line in table_lines[1 : 1 + len(model_order)]] == \
            [r["num_pl_spikes"] for r in csv_rows]
