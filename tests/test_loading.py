"""Checkpoint loading: formats, Lightning checkpoints, folders, and untrusted or broken files."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ww_monitor as wwm
from ww_monitor.analysis.loading import load_state_dict


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))


def _alphas(report):
    return [round(l.alpha, 10) for l in report.layers]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin"])
def test_state_dict_files(tmp_path, model, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(model.state_dict(), path)
    assert _alphas(wwm.analyze(path)) == _alphas(wwm.analyze(model))
    assert _alphas(wwm.analyze(str(path))) == _alphas(wwm.analyze(model))


def test_lightning_style_checkpoint(tmp_path, model):
    path = tmp_path / "epoch=0.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "optimizer_states": [], "callbacks": {}}, path)
    r = wwm.analyze(path)
    assert [l.name for l in r.layers] == ["model.0", "model.2"]
    assert _alphas(r) == _alphas(wwm.analyze(model))


def test_safetensors_and_sharded_folder(tmp_path, model):
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({k: v for k, v in sd.items() if k.startswith("0.")}, str(tmp_path / "part-1.safetensors"))
    save_file({k: v for k, v in sd.items() if k.startswith("2.")}, str(tmp_path / "part-2.safetensors"))
    assert set(load_state_dict(tmp_path)) == set(sd)
    assert _alphas(wwm.analyze(tmp_path)) == _alphas(wwm.analyze(model))


class _Payload:
    """Unpickling this object runs os.system: exactly what a weights-only load must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.randn(8, 8), "x": _Payload(marker)}, path)
    with pytest.raises(wwm.CheckpointError, match=r"refused to load.*weights_only=False"):
        wwm.analyze(path)
    assert not marker.exists()


def test_opt_out_loads_trusted_pickles(tmp_path, model):
    path = tmp_path / "full_model.pt"
    torch.save(model, path)  # a whole pickled module: needs weights_only=False
    with pytest.raises(wwm.CheckpointError, match="refused"):
        wwm.analyze(path)
    assert _alphas(wwm.analyze(path, weights_only=False)) == _alphas(wwm.analyze(model))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b"not a checkpoint at all"), "corrupt"),
        (lambda p: p.write_bytes(b""), "corrupt"),
    ],
)
def test_corrupt_files(tmp_path, make, message):
    path = tmp_path / "broken.pt"
    make(path)
    with pytest.raises(wwm.CheckpointError, match=message):
        wwm.analyze(path)


def test_truncated_checkpoint(tmp_path, model):
    good = tmp_path / "good.pt"
    torch.save(model.state_dict(), good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(wwm.CheckpointError, match="corrupt, truncated"):
        wwm.analyze(bad)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(wwm.CheckpointError, match="safetensors"):
        wwm.analyze(st)


def test_missing_unsupported_and_empty(tmp_path):
    with pytest.raises(wwm.CheckpointError, match="no such file"):
        wwm.analyze(tmp_path / "nope.ckpt")
    txt = tmp_path / "weights.txt"
    txt.write_text("1 2 3")
    with pytest.raises(wwm.CheckpointError, match=r"unsupported file type .txt"):
        wwm.analyze(txt)
    with pytest.raises(wwm.CheckpointError, match="folder holds no"):
        load_state_dict(_empty_dir(tmp_path))
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 1, "lr": 0.1}, no_tensors)
    with pytest.raises(wwm.CheckpointError, match="holds no weight tensors"):
        wwm.analyze(no_tensors)


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d


def test_pickle_protocol_error_is_clean(tmp_path):
    path = tmp_path / "raw.pkl.pt"
    path.write_bytes(pickle.dumps({"a": 1}))  # legacy raw pickle, not torch's zip format
    with pytest.raises(wwm.CheckpointError):
        wwm.analyze(path)
