"""TempBalance under real 2-process CPU DDP (gloo): rank 0 computes, every rank applies the same factors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_ddp import _checkout_path

pytest.importorskip("pytorch_lightning")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    import ww_monitor
    import ww_monitor.balancing.core as cb_module

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 80),
                                     nn.ReLU(), nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 10))

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)}

    class Probe(pl.Callback):
        def __init__(self):
            self.seen = []

        def on_train_start(self, trainer, pl_module):
            if trainer.global_rank != 0:  # only rank 0 may compute: any other rank that tries fails loudly
                def refuse(*args, **kwargs):
                    raise AssertionError("a rank other than 0 computed the factors")
                cb_module.own_alphas = refuse
            trainer.optimizers[0].register_step_pre_hook(
                lambda o, a, k: self.seen.append([g["lr"] for g in o.param_groups]))

    if __name__ == "__main__":
        out = sys.argv[1]
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 32, generator=g), torch.randint(0, 10, (128,), generator=g))
        tb, probe = ww_monitor.TempBalance(), Probe()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False,
                             callbacks=[tb, probe], enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False)
        trainer.fit(Net(), DataLoader(data, batch_size=16))
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"history": tb.history.state_dict(), "seen": probe.seen, "failures": tb.stats["failures"],
                       "layers": tb.group_layers(), "weights": [float(p.sum()) for p in trainer.lightning_module.parameters()]}, f)
    """
)


def test_two_process_ddp_applies_identical_factors(tmp_path):
    script = tmp_path / "ddp_balance.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=240,
                         env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    steps_per_epoch = 128 // 16 // 2
    records = r0["history"]["records"]
    assert [r["step"] for r in records] == [0, steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert r0["failures"] == r1["failures"] == 0
    assert r0["history"] == r1["history"]  # the same alphas and factors on both ranks
    assert r0["layers"] == r1["layers"] == ["net.0", "net.2", "net.4", "net.6", "net.8"]
    assert any(f != 1.0 for r in records for f in r["factors"])
    assert r0["seen"] == r1["seen"] and len(r0["seen"]) == 3 * steps_per_epoch  # identical lrs at every step
    for k, lrs in enumerate(r0["seen"]):
        epoch = k // steps_per_epoch
        rec = [r for r in records if r["step"] <= k][-1]
        scheduled = 0.1 * 0.7 ** epoch  # StepLR stepped per epoch
        assert lrs == pytest.approx([f * scheduled for f in rec["factors"]], rel=1e-12)
    assert r0["weights"] == r1["weights"]  # DDP kept the replicas identical under per-layer lrs
