"""Alerts that summarise (issue 21): one finding per rule and snapshot, every layer still recorded.

Unit tests of the grouping and the default ``alpha_low`` scope, then a real Lightning run of a
44-matrix LLaMA built from a config, with a threshold that makes every layer fire at once: one
console warning per snapshot, one ``ww/alerts`` entry per snapshot (read back from the event
file), every layer in ``alerts_fired``, links in TensorBoard's markdown and in the HTML report.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ww_monitor.analysis.phases import Phase
from ww_monitor.analysis.results import LayerResult
from ww_monitor.errors import WWMonitorError
from ww_monitor.monitoring.alerts import Alert, AlertConfig, AlertTracker, WWMonitorAlert
from ww_monitor.outputs.alert_text import alerts_markdown, console_text

pl = pytest.importorskip("pytorch_lightning")
transformers = pytest.importorskip("transformers")


def llama_names(blocks: int = 6) -> list[str]:
    names = ["model.model.embed_tokens"]
    for i in range(blocks):
        names += [f"model.model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"model.model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    return [*names, "model.lm_head"]


def low(name, alpha):
    return Alert("alpha_low", name, alpha, 2.0, 96, 2, f"alpha={alpha:.2f} < 2 in {name}: very heavy-tailed, possibly "
                 "over-trained [what to do: docs/alerts.md#alpha_low]", detail=f"alpha={alpha:.2f} < 2")


def test_one_line_per_rule_with_counts_roles_and_the_worst():
    names = llama_names()
    fired = [*[n for n in names if n.endswith(("q_proj", "k_proj"))][:9], "model.lm_head"]
    alphas = {n: 1.9 - 0.02 * i for i, n in enumerate(fired)}
    tails = {n: 60 for n in names}
    tails["model.lm_head"] = 12  # the lowest alpha, but on a short tail: not the worst
    alerts = [low(n, alphas[n]) for n in fired]
    alerts.append(Alert("rank_collapse", names[5], 0.2, 0.1, 96, 2, f"rank collapse in {names[5]}: 26/128 "
                        "eigenvalues are ~0 (20.3% > 10%); dead units? [what to do: docs/alerts.md#rank_collapse]",
                        detail="26/128 eigenvalues are ~0 (20.3% > 10%)"))
    text = console_text(alerts, 96, active=11, layer_names=names, tails=tails)
    lines = text.splitlines()
    assert lines[0] == "ww_monitor: 11 alert(s) at step 96 (11 active):"
    assert lines[1] == ("  rank collapse in layers.0.mlp.gate_proj: 26/128 eigenvalues are ~0 (20.3% > 10%); dead "
                        "units? [what to do: docs/alerts.md#rank_collapse]")  # most severe first
    assert lines[2].startswith("  alpha < 2 in 10 of 44 layers: 5 q_proj, 4 k_proj, lm_head; worst ")
    worst = re.search(r"worst (.*?):", lines[2]).group(1)
    assert "lm_head" not in worst and worst.startswith("layers.4.self_attn.q_proj (1.74)")
    assert lines[2].endswith("[what to do: docs/alerts.md#alpha_low]")
    assert "model.model." not in text


def test_a_band_finding_reads_as_one_line_with_its_margin_and_every_layer_stays_structured():
    """The tracker's own alerts: the group line says the margin, each alert says the model's share."""
    names = llama_names(2)
    t = AlertTracker(AlertConfig(alpha_confirm_snapshots=1))
    snap = [LayerResult(name=n, kind="linear", N=256, M=128, Q=2.0, num_evals=128, num_pl_spikes=100, fit_ok=True,
                        alpha=1.6 if n.endswith(("v_proj", "o_proj", "lm_head")) else 3.0, phase=Phase.HEAVY_TAILED)
            for n in names]
    alerts = t.update(snap, [], 96, 2)
    assert sorted(a.layer for a in alerts) == [n for n in sorted(names) if n.endswith(("v_proj", "o_proj", "lm_head"))]
    text = console_text(alerts, 96, active=5, layer_names=names)
    assert text.startswith("ww_monitor alert at step 96: alpha < 2 (by 2 standard errors) in 5 of 16 layers: "
                           "2 v_proj, 2 o_proj, lm_head; worst ")
    # 12 layers read (q/k skipped): each alert says the share that made it a finding about the model
    assert all("alpha < 2 (by 2 standard errors) in 5 of the 12 layers it reads" in a.message for a in alerts)


def test_markdown_links_and_every_layer_once():
    names = llama_names()
    alerts = [low(n, 1.8) for n in names[1:4]]
    alerts.append(Alert("alpha_low", names[9], float("nan"), 2.0, 96, 2, "resolved", resolved=True))
    md = alerts_markdown(alerts, 96, active=3, layer_names=names)
    assert md.splitlines()[0] == "**3 alert(s) at step 96 (3 active)**"
    assert "([what to do](docs/alerts.md#alpha_low))" in md
    for n in names[1:4]:
        short = n[len("model.model."):]
        assert md.count(f"`{short}`") == 1  # each layer named once, by its displayed name
    assert "* resolved: **alpha_low** on `layers.1.self_attn.k_proj`" in md


def test_single_alert_reads_as_before_with_the_displayed_name():
    text = console_text([low("model.lm_head", 1.62)], 96, 1, llama_names())
    assert text == ("ww_monitor alert at step 96: alpha=1.62 < 2 in lm_head: very heavy-tailed, possibly "
                    "over-trained [what to do: docs/alerts.md#alpha_low]")


def _layer(name, alpha):
    return LayerResult(name=name, kind="linear", N=344, M=128, Q=2.7, num_evals=128, alpha=alpha, fit_ok=True,
                       num_pl_spikes=50, reliable=True, phase=Phase.HEAVY_TAILED)


@pytest.mark.parametrize("name, skipped", [
    ("model.model.layers.0.self_attn.q_proj", True), ("model.model.layers.0.self_attn.k_proj", True),
    ("bert.encoder.layer.0.attention.self.query", True), ("bert.encoder.layer.0.attention.self.key", True),
    ("encoder.block.0.layer.0.SelfAttention.q", True), ("model.model.layers.0.self_attn.v_proj", False),
    ("transformer.h.0.attn.c_attn", False), ("net.2", False), ("keyboard", False),
])
def test_alpha_low_skips_attention_query_key_by_default(name, skipped):
    tracker = AlertTracker()
    fired = []
    for step in (0, 1):  # the band rules need two consecutive snapshots
        fired += tracker.update([_layer(name, 1.5)], [], step, 0)
    assert (fired == []) is skipped
    everything = AlertTracker(AlertConfig(alpha_low_exclude=()))
    assert [a.rule for s in (0, 1) for a in everything.update([_layer(name, 1.5)], [], s, 0)] == ["alpha_low"]


def test_alpha_low_exclude_is_validated():
    assert AlertConfig(alpha_low_exclude=r"lm_head$").alpha_low_exclude == (r"lm_head$",)
    with pytest.raises(WWMonitorError, match="alpha_low_exclude"):
        AlertConfig(alpha_low_exclude=["q_proj("])


def test_a_44_matrix_llama_floods_into_one_warning_per_snapshot(tmp_path):
    """Every reliable layer is "below" a threshold of 1e9 at once: one warning and one TB entry."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ww_monitor import WeightWatcherCallback
    from ww_monitor.outputs.offline_report import load_run, render_html

    class Copy(pl.LightningModule):
        def __init__(self):
            super().__init__()
            cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                                           num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4,
                                           max_position_embeddings=16)
            self.model = transformers.LlamaForCausalLM(cfg)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 256, (16, 16))), batch_size=8)
    flood = AlertConfig(alpha_low=1e9, alpha_high=2e9, alpha_confirm_snapshots=1, alpha_low_exclude=())
    ww = WeightWatcherCallback(every_n_epochs=1, blocking=True, figures_every_n_snapshots=None, alerts=flood,
                               min_evals=8)
    logger = pl.loggers.TensorBoardLogger(str(tmp_path), name="llama")
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=logger, callbacks=[ww],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WWMonitorAlert)
        trainer.fit(Copy(), data)
    layers = ww.history[0].layers
    assert len(layers) == 44
    reliable_ones = [n for n, r in ww.history[0].metric("reliable").items() if r > 0.5]
    first = [a for a in ww.alerts_fired if a.step == ww.history.steps[0]]
    assert len(first) == len(reliable_ones) >= 40  # the structured list keeps every layer
    assert all(a.message.count(a.layer) == 1 for a in first)  # each message names its layer once
    alert_warnings = [w for w in caught if issubclass(w.category, WWMonitorAlert)]
    steps_with_alerts = sorted({a.step for a in ww.alerts_fired})
    assert len(alert_warnings) == len(steps_with_alerts) >= 1  # at most one warning per snapshot
    text = str(alert_warnings[0].message)
    assert text.startswith(f"ww_monitor alert at step {steps_with_alerts[0]}: alpha < 1e+09 (by 2 standard errors) "
                           f"in {len(first)} of 44 "
                           "layers: 6 q_proj, 6 k_proj") and "model.model" not in text
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    acc.Reload()
    entries = acc.Tensors("ww/alerts/text_summary")
    assert [e.step for e in entries] == steps_with_alerts  # one entry per snapshot
    md = entries[0].tensor_proto.string_val[0].decode()
    assert "[what to do](docs/alerts.md#alpha_low)" in md and "`lm_head`" in md
    page = render_html(load_run(logger.log_dir))
    assert re.search(r'<a href="[^"]*alerts\.md#alpha_low">what to do</a>', page)
