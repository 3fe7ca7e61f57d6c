"""The training-time defaults watch what trains: LoRA adapter updates at every snapshot
(``peft="auto"``), frozen matrices analysed once and carried forward (``watch_frozen=False``),
gradual unfreezing picked up, on every front door; TensorBoard events read back."""

import re

import numpy as np
import pytest
import torch
from test_callback import read_events, scalar_steps, trainer_kwargs
from torch import nn

import ww_monitor
from ww_monitor.analysis.adapters import ZERO_UPDATE_REASON
from ww_monitor.errors import WWMonitorError

pl = pytest.importorskip("pytorch_lightning")

pytestmark = pytest.mark.filterwarnings("ignore:.*(no logger|not analysed|figures).*:RuntimeWarning",
                                        "ignore:.*rank collapse in net.0:ww_monitor.monitoring.alerts.WWMonitorAlert")


# ------------------------------------------------------------------ a LoRA fine-tune of a config-built LLaMA
def lora_llama():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    base = transformers.LlamaForCausalLM(config)
    return peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0))


class LoraLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.lm = lora_llama()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.lm(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def token_data(n=32, seq=16, batch_size=8):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 64, (n, seq), generator=g)), batch_size=batch_size)


def test_lora_fine_tune_at_the_callback_defaults_watches_the_adapters(tmp_path, capsys):
    from pytorch_lightning.loggers import TensorBoardLogger

    cb = ww_monitor.WeightWatcherCallback()  # every default: background analysis, cost budget, alerts on
    model = LoraLM()
    trainer = pl.Trainer(max_epochs=3, callbacks=[cb], **trainer_kwargs(tmp_path, logger=TensorBoardLogger(
        str(tmp_path), name="tb", version=0)))
    trainer.fit(model, token_data())
    base = [n for n in cb.history[0].layers]
    adapters = sorted(f"lm.base_model.model.model.layers.{i}.self_attn.{p}.lora_BA.default"
                      for i in range(2) for p in ("q_proj", "v_proj"))
    steps = cb.history.steps
    assert steps[0] == 0 and steps[-1] == trainer.global_step and len(steps) >= 2
    # Baseline: every base weight (7 per block, embeddings, head) analysed once, marked frozen; the
    # adapters' updates are exactly zero at initialisation: skipped with the reason, no alert.
    first = cb.history[0]
    assert len(base) == 2 * 7 + 2 and all(f == 1.0 for f in first.values[:, first.columns.index("frozen")])
    assert sorted(n for n, reason in first.skipped if reason == ZERO_UPDATE_REASON) == adapters
    # Every later snapshot: exactly the adapter updates, their r = 8 eigenvalues, not frozen.
    df = cb.history.to_pandas()
    for step in steps[1:]:
        rows = df[df.step == step]
        assert sorted(rows.name) == adapters and not rows.frozen.any() and (rows.num_evals == 8).all()
    assert (df[df.name.isin(base)].step == 0).all() and df[df.name.isin(base)].frozen.all()
    assert not any(a.rule == "rank_collapse" for a in cb.alerts_fired)
    # The summary covers what trains (the adapters), at the baseline as later; the rest is counted.
    assert [r.summary["num_frozen"] for r in cb.history] == [len(base)] * len(steps)
    assert [r.summary["num_layers"] for r in cb.history] == [0] + [len(adapters)] * (len(steps) - 1)
    frozen_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if not p.requires_grad and p.ndim == 2)
    assert cb.stats["layers_carried"] == len(base) * (len(steps) - 1)
    assert cb.stats["carried_bytes"] == frozen_bytes * (len(steps) - 1)
    assert cb.stats["matrices_copied"] == len(adapters) and cb.stats["snapshot_bytes"] == len(adapters) * 8 * 8 * 4

    # TensorBoard: frozen layers logged at the baseline only, the adapters at every later snapshot.
    acc = read_events(tmp_path / "tb" / "version_0")
    for layer in base:
        for tag in (f"ww/alpha/{layer}", f"ww/log_norm/{layer}", f"ww/frozen/{layer}"):
            assert scalar_steps(acc, tag) == [0], tag
        assert [h.step for h in acc.Histograms(f"ww/esd/{layer}")] == [0]
    for layer in adapters:
        assert scalar_steps(acc, f"ww/log_norm/{layer}") == steps[1:]
        assert f"ww/frozen/{layer}" not in acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("ww/summary/num_frozen")] == [len(base)] * len(steps)
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = acc.Tensors("custom_scalars__config__")  # the layout's per-block charts: the adapters
    layout = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    (per_block,) = [c for c in layout.category if c.title == "ww alpha per block"]
    patterns = [re.compile(tag) for chart in per_block.chart for tag in chart.multiline.tag]
    assert all(any(p.search(f"ww/alpha/{layer}") for p in patterns) for layer in adapters)
    assert not any(p.search(f"ww/alpha/{layer}") for p in patterns for layer in base)
    texts = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("ww/layers/text_summary")}
    assert "| frozen |" in texts[0] and f"{len(base)} frozen layer(s) not analysed again" in texts[steps[-1]]

    # ww-monitor report: the frozen layers are in the last snapshot's table, with their baseline values.
    from test_report import report

    from ww_monitor.outputs.run_data import load_run

    rc, _, stderr = report([tmp_path / "tb", "--out", tmp_path / "report.html"], capsys)
    assert rc == 0, stderr
    assert (tmp_path / "report.html").read_text().count("yes, step 0") == len(base)
    rows = {row["layer"]: row for row in load_run(tmp_path / "tb").table}
    assert set(rows) == set(base) | set(adapters)
    alpha0 = dict(zip(first.layers, first.values[:, first.columns.index("alpha")]))
    for layer in base:
        assert rows[layer]["frozen"] == 0 and rows[layer]["alpha"] == pytest.approx(alpha0[layer], rel=1e-6)
    assert all(rows[layer]["frozen"] is None for layer in adapters)


# ------------------------------------------------------------------ a frozen half, gradual unfreezing
class FrozenHalf(pl.LightningModule):
    """net.0 frozen (and rank-deficient: half its inputs zeroed), net.2 frozen until `unfreeze_at`,
    net.6 trainable until `freeze_at`, net.4 always trainable."""

    def __init__(self, unfreeze_at=2, freeze_at=1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48),
                                 nn.ReLU(), nn.Linear(48, 16))
        with torch.no_grad():
            self.net[0].weight[:, :16] = 0.0  # rank 16 of 32: a rank-collapse finding at the baseline
        for layer in (self.net[0], self.net[2]):
            layer.weight.requires_grad_(False)
        self.unfreeze_at, self.freeze_at = unfreeze_at, freeze_at

    def on_train_epoch_start(self):  # gradual unfreezing (and a layer frozen later)
        if self.current_epoch == self.unfreeze_at:
            self.net[2].weight.requires_grad_(True)
        if self.current_epoch == self.freeze_at:
            self.net[6].weight.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # a frozen weight has no grad: SGD leaves it


def vector_data(n=64, batch_size=16):
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 16, (n,), generator=g)),
                      batch_size=batch_size)


def fit_frozen_half(tmp_path, **kwargs):
    cb = ww_monitor.WeightWatcherCallback(blocking=True, figures_every_n_snapshots=None, **kwargs)
    model = FrozenHalf()
    trainer = pl.Trainer(max_epochs=4, callbacks=[cb], **trainer_kwargs(tmp_path, logger=False))
    trainer.fit(model, vector_data())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return cb, model


def rows_of(history, layer):
    """``[(step, frozen)]`` of a layer's rows in the history."""
    df = history.to_pandas()
    return [(int(s), bool(f)) for s, f in zip(df[df.name == layer].step, df[df.name == layer].frozen)]


def test_frozen_layers_are_analysed_once_and_unfrozen_ones_watched_again(tmp_path):
    cb, _model = fit_frozen_half(tmp_path)
    assert cb.history.steps == [0, 4, 8, 12, 16]
    assert rows_of(cb.history, "net.0") == [(0, True)]  # frozen throughout: the baseline only
    assert rows_of(cb.history, "net.2") == [(0, True), (12, False), (16, False)]  # unfrozen at epoch 2
    assert rows_of(cb.history, "net.4") == [(s, False) for s in (0, 4, 8, 12, 16)]
    # Frozen at epoch 1: analysed once more (its weights moved since step 4? no, but that is not
    # known without a copy), then carried forward; the two analyses agree.
    assert rows_of(cb.history, "net.6") == [(0, False), (4, False), (8, True)]
    log_norms = cb.history.to_pandas().query("name == 'net.6'").log_norm.tolist()
    assert log_norms[1] == pytest.approx(log_norms[2], rel=1e-12)
    unfrozen = cb.history.to_pandas().query("name == 'net.2'").log_norm.tolist()
    assert unfrozen[1] != pytest.approx(unfrozen[0], rel=1e-6)  # it trained after unfreezing
    # Copied (and analysed) once per row; carried 4 + 2 + 2 times; the last snapshot copied net.2, net.4.
    assert cb.stats["layers_analysed_here"] == len(cb.history.to_pandas()) == 12
    assert cb.stats["layers_carried"] == 8 and cb.stats["frozen_layers"] == 2
    assert cb.stats["carried_bytes"] == 4 * 64 * 32 * 4 + 2 * 64 * 64 * 4 + 2 * 16 * 48 * 4
    assert cb.stats["matrices_copied"] == 2 and cb.stats["snapshot_bytes"] == (64 * 64 + 48 * 64) * 4
    # Summary over the trainable layers at each snapshot; frozen ones counted.
    assert [r.summary["num_layers"] for r in cb.history] == [2, 2, 1, 2, 2]
    assert [r.summary["num_frozen"] for r in cb.history] == [2, 2, 3, 2, 2]
    # The frozen, rank-deficient layer alerted once at the baseline and was not re-evaluated after.
    collapse = [a for a in cb.alerts_fired if a.rule == "rank_collapse"]
    assert [(a.layer, a.step) for a in collapse] == [("net.0", 0)]
    assert ("rank_collapse", "net.0") in cb.alert_tracker.active
    # The checkpoint keeps what is carried; its report lists the frozen layers with their last analysis.
    from ww_monitor.outputs.run_data import load_run

    state = next(v for k, v in torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"].items()
                 if k.startswith("WeightWatcherCallback"))
    assert state["frozen"] == ["net.0", "net.6"]
    table = {row["layer"]: row for row in load_run(tmp_path / "last.ckpt").table}
    assert [table[n]["frozen"] for n in ("net.0", "net.2", "net.4", "net.6")] == [0, None, None, 8]
    assert table["net.6"]["log_norm"] == pytest.approx(log_norms[2], rel=1e-12)


def test_watch_frozen_true_analyses_every_matrix_at_every_snapshot(tmp_path):
    cb, _ = fit_frozen_half(tmp_path, watch_frozen=True)
    df = cb.history.to_pandas()
    for step in (0, 4, 8, 12, 16):
        assert sorted(df[df.step == step].name) == ["net.0", "net.2", "net.4", "net.6"]
    assert rows_of(cb.history, "net.0") == [(s, True) for s in (0, 4, 8, 12, 16)]  # still marked frozen
    assert cb.stats["layers_carried"] == 0 and cb.stats["carried_bytes"] == 0
    assert cb.stats["snapshot_bytes"] == (32 * 64 + 64 * 64 + 64 * 48 + 48 * 16) * 4
    assert [r.summary["num_layers"] for r in cb.history] == [4] * 5  # every layer in the means, as before


@pytest.mark.parametrize("kwargs, match", [(dict(peft="lora"), "`peft`"), (dict(watch_frozen=1), "`watch_frozen`")])
def test_new_options_are_validated(kwargs, match):
    for front_door in (ww_monitor.WeightWatcherCallback, lambda **kw: ww_monitor.Monitor(None, **kw)):
        with pytest.raises(WWMonitorError, match=match):
            front_door(**kwargs)


def test_offline_analyze_keeps_peft_false_and_marks_frozen_layers():
    model = lora_llama()
    report = ww_monitor.analyze(model)
    assert not any("lora" in layer.name for layer in report.layers)  # weightwatcher's default
    assert all(layer.frozen for layer in report.layers) and report.summary()["num_frozen"] == len(report.layers)
    auto = ww_monitor.analyze(model, peft="auto")  # base weights plus the (zero) updates, no merged weights
    assert [l.name for l in auto.layers] == [l.name for l in report.layers]
    assert sum(s.reason == ZERO_UPDATE_REASON for s in auto.skipped) == 4
    assert ww_monitor.analyze(model.state_dict()).summary()["num_frozen"] == 0  # tensors: unknown, not frozen


# ------------------------------------------------------------------ Monitor and the Hugging Face Trainer
def test_monitor_carries_frozen_layers_and_keeps_them_across_a_resume(tmp_path):
    from test_monitor import make_model, train

    model = make_model()
    model[0].weight.requires_grad_(False)
    kwargs = dict(every_n_steps=5, blocking=True, figures_every_n_snapshots=None)
    monitor = ww_monitor.Monitor(None, **kwargs)
    train(monitor, model, steps=7)  # snapshots at 1 and 5
    torch.save(monitor.state_dict(), tmp_path / "monitor.pt")
    monitor.close()

    resumed = ww_monitor.Monitor(None, **kwargs)
    resumed.load_state_dict(torch.load(tmp_path / "monitor.pt", weights_only=True))
    last = train(resumed, model, steps=8, start=8)
    resumed.close(model, last)
    assert resumed.history.steps == [1, 5, 10, 15]
    assert rows_of(resumed.history, "0") == [(1, True)]  # not re-analysed after the resume either
    assert rows_of(resumed.history, "2") == [(s, False) for s in (1, 5, 10, 15)]
    assert resumed.stats["layers_carried"] == 3


def test_huggingface_trainer_watches_lora_adapters_by_default(tmp_path, monkeypatch):
    import test_huggingface as hf

    peft = pytest.importorskip("peft")
    tiny_bert = hf.tiny_bert

    def lora_bert():
        return peft.get_peft_model(tiny_bert(), peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
                                                                    target_modules=["query", "value"]))

    monkeypatch.setattr(hf, "tiny_bert", lora_bert)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    ww = hf.callback()
    hf.trainer_for(tmp_path, ww).train()
    assert ww.history.steps == [0, 3, 6]
    df = ww.history.to_pandas()
    base = sorted(df[df.step == 0].name)
    adapters = [n for n, reason in ww.history[0].skipped if reason == ZERO_UPDATE_REASON]
    assert len(adapters) == 2 and base and df[df.step == 0].frozen.all()
    for step in (3, 6):
        assert sorted(df[df.step == step].name) == sorted(adapters)
    acc = hf.read_run(tmp_path / "tb")
    for layer in base:
        assert [e.step for e in acc.Scalars(f"ww/alpha/{layer}")] == [0], layer
    for layer in adapters:
        assert [e.step for e in acc.Scalars(f"ww/log_norm/{layer}")] == [3, 6], layer
    np.testing.assert_array_equal([r.summary["num_frozen"] for r in ww.history], [len(base)] * 3)


# ------------------------------------------------------------------ DDP: every rank carries the same layers
DDP_SCRIPT = """
import json, os, socket, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn

def run(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import ww_monitor
    torch.manual_seed(0)
    sizes = [32, 96, 80, 64, 48, 40, 16]
    net = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    for i in (0, 2, 4):  # a frozen half
        net[i].weight.requires_grad_(False)
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = ww_monitor.Monitor(None, every_n_steps=2, blocking=True, figures_every_n_snapshots=None)
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 7):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 16, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
        monitor.step(model, step)
    monitor.close(model, 6)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"records": [[r.step, list(r.layers), list(r.ranks), r.values[:, r.columns.index("frozen")].tolist()]
                               for r in monitor.history],
                   "stats": {k: monitor.stats[k] for k in ("layers_analysed_here", "layers_carried", "carried_bytes",
                                                           "frozen_layers")}}, f)
    dist.barrier()  # gloo aborts if a peer tears down with transfers in flight
    dist.destroy_process_group()

if __name__ == "__main__":
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    mp.spawn(run, args=(2, port, sys.argv[1]), nprocs=2)
"""


def test_ddp_ranks_carry_the_same_frozen_layers_and_share_the_rest(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from test_ddp import _checkout_path

    script = tmp_path / "ddp_frozen.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    r0, r1 = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert r0["records"] == r1["records"]  # the same merged history, ownership included, on both ranks
    steps = [rec[0] for rec in r0["records"]]
    assert steps == [1, 2, 4, 6]
    frozen, trainable = ["0", "2", "4"], ["1", "3", "5"]
    first = r0["records"][0]
    assert first[1] == ["0", "1", "2", "3", "4", "5"] and first[3] == [1.0, 0.0] * 3
    for _step, layers, ranks, flags in r0["records"][1:]:
        assert layers == trainable and flags == [0.0] * 3
        assert set(ranks) == {0, 1}  # the trainable layers are shared by both ranks, not left to one
    for key in ("layers_carried", "carried_bytes", "frozen_layers"):
        assert r0["stats"][key] == r1["stats"][key], key
    assert r0["stats"]["layers_carried"] == len(frozen) * 3 and r0["stats"]["frozen_layers"] == 3
    total_rows = sum(len(rec[1]) for rec in r0["records"])
    assert r0["stats"]["layers_analysed_here"] + r1["stats"]["layers_analysed_here"] == total_rows
