"""``ww-monitor analyze`` on real transformer checkpoints: the table fits the terminal width,
``--columns`` / ``--sort`` / ``--worst``, and safetensors files listed in the module's order."""

import csv
import io
import json
import os
import subprocess

import pytest
import torch

transformers = pytest.importorskip("transformers")
pl = pytest.importorskip("pytorch_lightning")

from ww_monitor.analysis.model_order import model_order_key  # noqa: E402
from ww_monitor.analysis.results import LAYER_COLUMNS  # noqa: E402
from ww_monitor.outputs.cli import main  # noqa: E402
from ww_monitor.outputs.table import KEEP_PRIORITY, TABLE_COLUMNS  # noqa: E402

BLOCKS = 6  # 6 x (q, k, v, o, gate, up, down) + embeddings + head = 44 matrices, as in the run


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=BLOCKS, num_attention_heads=4, num_key_value_heads=4,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


class LanguageModel(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = llama()

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A Lightning .ckpt written by a real Trainer (2 steps), and the same model as safetensors."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("llama")
    module = LanguageModel()
    ids = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=8))
    trainer.save_checkpoint(root / "llama.ckpt")
    save_file({k: v.contiguous() for k, v in module.model.state_dict().items()}, str(root / "llama.safetensors"))
    return root


def analyze(capsys, monkeypatch, *args, columns=None):
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", str(columns))
    code = main(["analyze", *map(str, args)])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def table_parts(out):
    """(header columns, rows as lists of cells, the remaining lines) of a table whose layers have no spaces."""
    lines = out.splitlines()
    header = lines[0].split()
    end = next(i for i, line in enumerate(lines) if not line or line.startswith("("))
    return header, [line.split() for line in lines[1:end]], lines[end:]


def test_console_script_fits_100_columns_on_a_lightning_checkpoint(checkpoints):
    """The acceptance check, as a user runs it: `COLUMNS=100 ww-monitor analyze model.ckpt`."""
    env = dict(os.environ, COLUMNS="100")
    res = subprocess.run(["ww-monitor", "analyze", str(checkpoints / "llama.ckpt")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    header, rows, rest = table_parts(res.stdout)
    assert len(rows) == 7 * BLOCKS + 2
    # displayed without the LightningModule's and the HF model's wrapper attributes (model.model.)
    assert rows[1][0] == "layers.0.self_attn.q_proj" and rows[-1][0] == "lm_head"
    # the columns left out are the lowest-priority ones; the note under the table names them
    dropped = [c for c in LAYER_COLUMNS if c in TABLE_COLUMNS and c not in header]
    assert dropped and set(dropped) == set(KEEP_PRIORITY[len(KEEP_PRIORITY) - len(dropped):])
    notes = " ".join(rest)
    assert f"(left out to fit 100 columns: {', '.join(dropped)} (--columns all shows them))" in notes
    assert "layer names without their wrapper prefix" in notes
    # the kept ones in the CSV/JSON order
    assert header == [c for c in LAYER_COLUMNS if c in header] and header[0] == "name"


@pytest.mark.parametrize("width", [100, 40, 28])
def test_every_line_fits_and_columns_all_restores_them(checkpoints, capsys, monkeypatch, width):
    for source in ("llama.ckpt", "llama.safetensors"):
        out = analyze(capsys, monkeypatch, checkpoints / source, columns=width)
        assert max(len(line) for line in out.splitlines()) <= width, source
        header, rows, _ = table_parts(out)
        assert {"name", "alpha"} <= set(header) and len(rows) == 7 * BLOCKS + 2
        assert not any(r[0].startswith("model.") for r in rows)  # the wrapper prefix is not displayed
        if width == 28:  # too narrow for the names: shortened in the middle
            assert any(r[0].startswith("layers.") and "…" in r[0] and r[0].endswith("_proj") for r in rows)
            assert "shortened in the middle" in " ".join(out.split())  # the note is wrapped to the width
    full = analyze(capsys, monkeypatch, checkpoints / "llama.ckpt", "--columns", "all", columns=width)
    assert table_parts(full)[0] == list(TABLE_COLUMNS)  # everything, at any width
    chosen = analyze(capsys, monkeypatch, checkpoints / "llama.ckpt", "--columns", "alpha,D,log_norm", columns=width)
    assert table_parts(chosen)[0] == ["name", "alpha", "D", "log_norm"]


def test_csv_and_json_do_not_depend_on_the_width(checkpoints, capsys, monkeypatch):
    out = {}
    for fmt in ("csv", "json"):
        out[fmt] = analyze(capsys, monkeypatch, checkpoints / "llama.ckpt", "--format", fmt)
        assert analyze(capsys, monkeypatch, checkpoints / "llama.ckpt", "--format", fmt, columns=40) == out[fmt]
    rows = list(csv.DictReader(io.StringIO(out["csv"])))
    layers = json.loads(out["json"])["layers"]
    assert len(rows) == len(layers) == 7 * BLOCKS + 2
    assert list(rows[0]) == list(layers[0]) == list(LAYER_COLUMNS)  # every column, whatever the width


def test_sort_and_worst(checkpoints, capsys, monkeypatch):
    from ww_monitor.outputs.worst_layers import worst_layers

    path = checkpoints / "llama.safetensors"
    every = list(csv.DictReader(io.StringIO(analyze(capsys, monkeypatch, path, "--format", "csv"))))
    alpha = {r["name"]: float(r["alpha"]) for r in every}
    out = analyze(capsys, monkeypatch, path, "--sort", "alpha", "--columns", "alpha", columns=100)
    _, rows, rest = table_parts(out)
    assert [float(r[1]) for r in rows] == pytest.approx(sorted(alpha.values()), rel=1e-3)
    assert "(sorted by alpha)" in rest
    down = analyze(capsys, monkeypatch, path, "--sort", "num_pl_spikes", "--descending", "--format", "csv")
    tails = [int(r["num_pl_spikes"]) for r in csv.DictReader(io.StringIO(down))]
    assert tails == sorted(tails, reverse=True)
    # --worst: the ranking of the figures (standard errors outside [2, 4], reliable fits), in every format
    tails = [int(r["num_pl_spikes"]) for r in every]
    reliable = [r["reliable"] == "True" for r in every]
    expected = [o.name for o in worst_layers(list(alpha), list(alpha.values()), tails, reliable, count=5)]
    assert len(expected) == 5 and set(expected) <= {r["name"] for r in every if r["reliable"] == "True"}
    _, rows, rest = table_parts(analyze(capsys, monkeypatch, path, "--worst", "5", columns=100))
    assert [r[0] for r in rows] == [e.removeprefix("model.") for e in expected]  # displayed names
    assert any("farthest outside alpha in [2, 4]" in line for line in rest)
    payload = json.loads(analyze(capsys, monkeypatch, path, "--worst", "5", "--format", "json"))
    assert [l["name"] for l in payload["layers"]] == expected
    assert payload["summary"]["num_layers"] == 7 * BLOCKS + 2  # the summary is still over every layer


@pytest.mark.parametrize("args, message", [
    (["--sort", "alhpa"], "--sort: no column 'alhpa'; did you mean 'alpha'?"),
    (["--columns", "name,aplha"], "--columns: no column 'aplha'; did you mean 'alpha'?"),
    (["--columns", "alpha", "--format", "json"], "--format json keeps every field"),
    (["--descending"], "give --sort too"),
])
def test_bad_table_options_exit_2_before_the_analysis(tmp_path, capsys, args, message):
    missing = tmp_path / "never-read.ckpt"  # the options are checked first: no file error
    assert main(["analyze", str(missing), *args]) == 2
    assert message in capsys.readouterr().err


def _module_order(model):
    return [k for k, v in model.state_dict().items() if v.dim() >= 2 and k.endswith(".weight")]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5", "gpt_neox"])
def test_safetensors_order_is_the_module_order(family):
    """Numbers as numbers, embeddings first, attention (q, k, v, o) before the MLP (gate, up, down)
    within a block, heads last, for the usual transformer naming schemes."""
    t = transformers
    build = {
        "llama": llama,
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=64, n_embd=32, n_layer=12, n_head=4, n_positions=32)),
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=12, num_attention_heads=4, intermediate_size=64)),
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                              num_heads=4)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=11, num_attention_heads=4)),
    }[family]
    order = _module_order(build())
    assert sorted(order) != order  # plain string order would not do
    assert sorted(order, key=model_order_key) == order


def test_safetensors_table_lists_layers_like_the_checkpoint(checkpoints, capsys, monkeypatch):
    ckpt = table_parts(analyze(capsys, monkeypatch, checkpoints / "llama.ckpt", "--columns", "alpha"))[1]
    st = table_parts(analyze(capsys, monkeypatch, checkpoints / "llama.safetensors", "--columns", "alpha"))[1]
    assert [r[0] for r in ckpt] == [r[0] for r in st]  # the same layers, shown without their wrapper prefixes
    assert [r[1] for r in ckpt] == [r[1] for r in st]
