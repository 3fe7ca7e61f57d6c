"""The cost plan (``ww-monitor plan``, ``callback.plan(model)``): from shapes alone, the same
matrices, skipped layers, bytes and rank split as the monitor's real snapshots."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ww_monitor
from ww_monitor.analysis.selection import select_matrices
from ww_monitor.analysis.shapes import load_shapes
from ww_monitor.monitoring.distributed import assign_owners, collect_into, matrix_cost
from ww_monitor.monitoring.snapshot import SnapshotBuilder
from ww_monitor.outputs.cli import main
from ww_monitor.outputs.plan import MAX_COLUMNS

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
#: Tiny configs of the families users train: GPT-2 (tied head, HF Conv1D) and a LLaMA whose
#: vocabulary (60000 rows) exceeds max_n=50000, so its embedding and head are skipped.
CONFIGS = {
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_layer=2, n_embd=64, n_head=2,
                 vocab_size=300, n_positions=64),
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=60000,
                  tie_word_embeddings=False),
}


def _write_config(tmp_path, name) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(CONFIGS[name]))
    return path


def _materialised(name) -> nn.Module:
    cfg = dict(CONFIGS[name])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg))


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # nothing may be downloaded
    return subprocess.run([sys.executable, "-m", "ww_monitor", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_from_config_equals_a_real_snapshot_of_the_materialised_model(tmp_path, name):
    meta, what = load_shapes(_write_config(tmp_path, name))
    assert all(p.is_meta for p in meta.parameters()) and type(meta).__name__ in what
    monitor = ww_monitor.Monitor(blocking=True, every_n_steps=1)
    plan = monitor.plan(meta)
    model = _materialised(name)
    with pytest.warns(RuntimeWarning, match="no logger or sink"):
        monitor.step(model, 1)  # the baseline: a real snapshot, copied and analysed
    record = monitor.history[0]
    assert [m.name for m in plan.matrices] == list(record.layers)
    assert len(plan.matrices) == monitor.stats["layers_analysed_here"]
    assert sum(plan.bytes_per_rank) == monitor.stats["snapshot_bytes"]
    assert [(s.name, s.reason) for s in plan.skipped] == list(record.skipped)
    if name == "llama":
        assert {s.name for s in plan.skipped} == {"model.embed_tokens", "lm_head"}
        assert all("max_n=50000" in s.reason for s in plan.skipped)
    else:  # the tied head is copied and analysed once, under the embedding's name
        (wte,) = [m for m in plan.matrices if m.name == "transformer.wte"]
        assert wte.aliases == ("lm_head",) and not plan.skipped
    monitor.close(model, 1)


def test_ranks_split_as_the_monitor_splits_them():
    model = _materialised("gpt2")
    ranks = 3
    monitor = ww_monitor.Monitor()
    plan = monitor.plan(model, ranks)
    owners, _ = collect_into(None, model, monitor.config, 0, ranks)  # what every rank computes
    assert {m.name: m.rank for m in plan.matrices} == owners
    selected, _ = select_matrices(model, monitor.config)
    assert [m.rank for m in plan.matrices] == assign_owners([matrix_cost(m) for m in selected], ranks)
    for rank in range(ranks):  # each rank's real snapshot copies what the plan says
        builder = SnapshotBuilder(0, 0, 0)
        collect_into(builder, model, monitor.config, rank, ranks)
        snap = builder.finish()
        assert snap.nbytes == plan.bytes_per_rank[rank] and len(snap) == plan.matrices_per_rank[rank]


def test_frozen_matrices_are_planned_for_the_baseline_only():
    model = _materialised("gpt2")
    for module in (model.transformer.wte, model.transformer.h[0]):  # a frozen embedding and block
        module.requires_grad_(False)
    monitor = ww_monitor.Monitor(blocking=True, every_n_steps=1)
    plan = monitor.plan(model, 2)
    frozen = {m.name for m in plan.frozen}
    assert frozen == {"transformer.wte"} | {m.name for m in plan.matrices if m.name.startswith("transformer.h.0.")}
    # after the baseline the monitor leaves the frozen matrices out before splitting the rest
    owners, _ = collect_into(None, model, monitor.config, 0, 2, carry=lambda m: m.frozen)
    assert {m.name: m.rank for m in plan.matrices if m.rank is not None} == owners
    assert {m.name: m.baseline_rank for m in plan.matrices} == collect_into(None, model, monitor.config, 0, 2)[0]
    single = monitor.plan(model)
    with pytest.warns(RuntimeWarning, match="no logger or sink"):
        monitor.step(model, 1)
    assert monitor.stats["snapshot_bytes"] == sum(m.nbytes for m in single.matrices)  # the baseline: all
    monitor.step(model, 2)
    assert monitor.stats["snapshot_bytes"] == sum(single.bytes_per_rank)  # then the trainable ones
    assert list(monitor.history[1].layers) == [m.name for m in single.matrices if m.rank is not None]
    monitor.close(model, 2)
    assert ww_monitor.Monitor(watch_frozen=True).plan(model).frozen == []


def test_cli_on_a_config_json(tmp_path, capsys):
    # A real subprocess with the Hub switched off: the plan needs no download.
    res = cli(_write_config(tmp_path, "llama"), "--ranks", "2", "--step-seconds", "0.5", "--format", "json")
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    meta, _ = load_shapes(_write_config(tmp_path, "llama"))
    expected = ww_monitor.Monitor().plan(meta, 2)
    assert [m["name"] for m in plan["matrices"]] == [m.name for m in expected.matrices]
    assert [r["bytes"] for r in plan["per_rank"]] == expected.bytes_per_rank
    assert [s["name"] for s in plan["skipped"]] == ["model.embed_tokens", "lm_head"]
    gap = plan["snapshot_seconds"] / 0.03
    assert plan["seconds_between_snapshots"] == pytest.approx(gap)
    assert plan["suggested_every_n_train_steps"] == int(-(-gap // 0.5))
    assert main(["plan", str(_write_config(tmp_path, "llama")), "--ranks", "2", "--every-n-steps", "1"]) == 0
    table = capsys.readouterr().out
    assert max(len(line) for line in table.splitlines()) <= MAX_COLUMNS
    assert "skipped (2):" in table and "model.embed_tokens [60000 x 64]: N=60000 > max_n=50000" in table
    assert "requested schedule:" in table and "(assumed; pass --step-seconds)" in table


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_cli_on_a_checkpoint_file_reads_shapes_only(tmp_path, capsys, fmt):
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 32).to(torch.bfloat16), nn.Conv2d(8, 16, 3),
                          nn.Linear(4, 2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    shapes, _ = load_shapes(path)
    assert set(shapes) == set(state) and all(t.is_meta for t in shapes.values())  # no tensor data read
    assert main(["plan", str(path), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    report = ww_monitor.analyze(path)  # the offline analysis of the same file: same selection
    assert [m["name"] for m in plan["matrices"]] == [layer.name for layer in report.layers]
    assert [s["name"] for s in plan["skipped"]] == [s.name for s in report.skipped] == ["4"]
    dtypes = {m["name"]: m["dtype"] for m in plan["matrices"]}
    assert dtypes == {"0": "float32", "2": "bfloat16", "3": "float32"}
    stored = {"0": state["0.weight"], "2": state["2.weight"], "3": state["3.weight"]}
    assert plan["per_rank"][0]["bytes"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_a_tied_weight_saved_once_is_planned_once(tmp_path):
    emb, head = nn.Embedding(100, 32), nn.Linear(32, 100, bias=False)
    head.weight = emb.weight
    torch.save(nn.ModuleDict({"emb": emb, "head": head, "x": nn.Linear(32, 64)}).state_dict(), tmp_path / "tied.pt")
    shapes, _ = load_shapes(tmp_path / "tied.pt")
    plan = ww_monitor.Monitor().plan(shapes)
    report = ww_monitor.analyze(tmp_path / "tied.pt")
    assert [(m.name, m.aliases) for m in plan.matrices] == [(l.name, l.aliases) for l in report.layers]
    assert plan.matrices[0].aliases == ("head",)


@pytest.mark.parametrize("args, argument", [
    (["--ranks", "0"], "--ranks"),
    (["--max-overhead", "2"], "--max-overhead"),
    (["--step-seconds", "-1"], "--step-seconds"),
    (["--device", "tpu"], "--device"),
    (["--estimate-above", "x"], "--estimate-above"),
    (["--every-n-steps", "5", "--every-n-epochs", "1"], "--every-n-epochs"),
])
def test_bad_arguments_exit_2_with_one_line_naming_the_argument(tmp_path, capsys, args, argument):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", str(_write_config(tmp_path, "gpt2")), *args])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and argument in err, err


def test_missing_inputs_and_missing_transformers_are_one_line_errors(tmp_path, capsys, monkeypatch):
    assert main(["plan", str(tmp_path / "nope.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"hidden_size": 8}')
    assert main(["plan", str(tmp_path / "bad.json")]) == 2
    assert "not a transformers config" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    assert main(["plan", str(_write_config(tmp_path, "gpt2"))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ww-monitor[huggingface]" in err


def test_gpu_times_are_unmeasured_not_invented(tmp_path, capsys):
    assert main(["plan", str(_write_config(tmp_path, "gpt2")), "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "GPU analysis time: unmeasured" in out and "schedule: not suggested" in out
    assert max(len(line) for line in out.splitlines()) <= MAX_COLUMNS
    meta, _ = load_shapes(_write_config(tmp_path, "gpt2"))
    plan = ww_monitor.Monitor().plan(meta, device="cuda")
    assert plan.snapshot_seconds() is None and plan.to_dict()["suggested_every_n_train_steps"] is None


def test_front_doors_plan_alike(tmp_path):
    meta, _ = load_shapes(_write_config(tmp_path, "llama"))
    from ww_monitor.huggingface import WeightWatcherCallback as HFCallback

    plans = [door.plan(meta, 2) for door in (ww_monitor.WeightWatcherCallback(exclude="mlp"),
                                             ww_monitor.Monitor(exclude="mlp"), HFCallback(exclude="mlp"))]
    names = [[m.name for m in p.matrices] for p in plans]
    assert names[0] == names[1] == names[2] and not any("mlp" in n for n in names[0])
    assert plans[0].bytes_per_rank == plans[1].bytes_per_rank == plans[2].bytes_per_rank


def test_llama_2_7b_plan_from_the_shipped_config():
    meta, what = load_shapes(ROOT / "configs" / "llama-2-7b.json")
    assert what == "LlamaForCausalLM from llama-2-7b.json"
    plan = ww_monitor.WeightWatcherCallback().plan(meta, 8, step_seconds=2.0)
    hidden, inter, layers, vocab = 4096, 11008, 32, 32000
    # 7 projections per block (q, k, v, o, gate, up, down) plus the embedding and the untied head;
    # none exceeds the default size limits (M = 4096 <= max_evals, N <= 32000 <= max_n).
    assert len(plan.matrices) == layers * 7 + 2 and not plan.skipped
    fp16 = 2
    assert sum(plan.bytes_per_rank) == fp16 * (layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden)
    assert sorted(plan.matrices_per_rank) == [28] * 6 + [29] * 2
    assert plan.bytes_per_rank == [sum(m.nbytes for m in plan.matrices if m.rank == r) for r in range(8)]
    big = [m for m in plan.matrices if m.shape == (hidden, inter)]
    assert len(big) == layers and all(m.sampled and m.sampled_seconds < m.seconds for m in big)
    slowest = plan.snapshot_seconds()
    assert plan.suggested_every_n_train_steps() == int(-(-slowest / 0.03 // 2.0))
