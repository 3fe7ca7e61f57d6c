"""A module, its state dict and its files give the same layers; HF checkpoint folders; strict JSON."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import ww_monitor as wwm
from ww_monitor.outputs.cli import main

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gpt2():
    """A GPT-2 from its config (tiny sizes, random init, no download): tied wte/lm_head, Conv1D."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=40,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _layers(report):
    return {l.name: (l.kind, l.aliases) for l in report.layers}


def test_gpt2_module_and_state_dict_agree(gpt2):
    from_module, from_state = wwm.analyze(gpt2), wwm.analyze(gpt2.state_dict())
    layers = _layers(from_module)
    assert layers["transformer.wte"] == ("embedding", ("lm_head",))  # tied head: analysed once
    assert "lm_head" not in layers and from_module.summary()["num_layers"] == 10
    assert layers["transformer.h.0.attn.c_attn"][0] == "conv1d_hf"
    assert layers["transformer.h.0.attn.c_proj"][0] == "conv1d_hf"  # square: by name, once Conv1D is proven
    assert _layers(from_state) == layers
    for a, b in zip(from_module.layers, from_state.layers):
        assert (a.name, a.alpha, a.lambda_max, a.log_norm) == (b.name, b.alpha, b.lambda_max, b.log_norm)
    assert from_state.summary() == from_module.summary()


@dataclass
class TrainingArgs:  # what transformers' Trainer pickles into training_args.bin: not tensors
    learning_rate: float = 5e-5
    output_dir: str = "out"


def _hf_checkpoint(model, folder, **save_kw):
    folder.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    model.save_pretrained(str(folder), **save_kw)
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save({"last_epoch": 1}, folder / "scheduler.pt")
    torch.save({"python": [1, 2], "cpu": torch.get_rng_state()}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    torch.save(TrainingArgs(), folder / "training_args.bin")
    opt.zero_grad()
    return folder


def test_hf_checkpoint_folder_is_read_as_its_model(gpt2, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel(gpt2.config)
    model.load_state_dict(gpt2.state_dict())
    folder = _hf_checkpoint(model, tmp_path / "checkpoint-1")
    saved = model.state_dict()  # after the optimizer step; wte and lm_head still share storage
    from_folder = wwm.analyze(folder)  # weights_only: no --unsafe-load needed
    from_state = wwm.analyze(saved)
    # the same layers and numbers; the tied head is stored once in the file, so no alias there
    assert {n: k for n, (k, _) in _layers(from_folder).items()} == {n: k for n, (k, _) in _layers(from_state).items()}
    assert _layers(from_state)["transformer.wte"][1] == ("lm_head",) and _layers(from_folder)["transformer.wte"][1] == ()
    for name in _layers(from_state):
        assert from_folder[name].alpha == from_state[name].alpha
    # (layers of 32 eigenvalues are "unreliable" and left out of the default means: include them)
    assert from_folder.summary(include_unreliable=True)["alpha"] == pytest.approx(
        from_state.summary(include_unreliable=True)["alpha"], rel=1e-12)

    capsys.readouterr()  # only the CLI's output below (transformers/deepspeed may print while saving)
    assert main(["analyze", str(folder), "--format", "json"]) == 0
    out, err = capsys.readouterr()
    payload = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert {l["name"] for l in payload["layers"]} == set(_layers(from_state))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        assert f"note: {name}: not model weights" in err
    assert "unsafe" not in err


def test_sharded_safetensors_and_pytorch_bin_folders(gpt2, tmp_path):
    from safetensors.torch import load_file

    sharded = tmp_path / "sharded"
    gpt2.save_pretrained(str(sharded), max_shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").exists()
    (sharded / "stale-copy.safetensors").write_bytes((sharded / shards[0]).read_bytes())  # not in the index
    expected = {k: v for s in shards for k, v in load_file(str(sharded / s)).items()}
    assert _layers(wwm.analyze(sharded)) == _layers(wwm.analyze(expected))

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    torch.save(gpt2.state_dict(), bin_folder / "pytorch_model.bin")
    torch.save(TrainingArgs(), bin_folder / "training_args.bin")
    assert _layers(wwm.analyze(bin_folder)) == _layers(wwm.analyze(gpt2))


def test_folder_with_only_trainer_state_says_so(tmp_path):
    torch.save({"state": {}}, tmp_path / "optimizer.pt")
    with pytest.raises(wwm.CheckpointError, match="optimizer/trainer state only"):
        wwm.analyze(tmp_path)


def test_json_is_strict_when_metrics_are_not_finite(tmp_path, capsys):
    """A constant matrix has no power-law tail: NaN metrics must come out as null."""
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    report = wwm.analyze(model)
    assert any(not math.isfinite(v) for l in report.layers for v in (l.alpha, l.D) if isinstance(v, float))
    text = report.to_json()
    assert "NaN" not in text and "Infinity" not in text
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert parsed["layers"][0]["alpha"] is None
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert main(["analyze", str(tmp_path / "m.pt"), "--format", "json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
