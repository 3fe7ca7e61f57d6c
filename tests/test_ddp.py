"""Real 2-process CPU DDP (gloo): the analysis is sharded across ranks and gathered on rank 0."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from test_callback import read_events, scalar_steps

pytest.importorskip("pytorch_lightning")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger
    import ww_monitor

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            sizes = [32, 96, 80, 64, 48, 40, 10]
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
            return x

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class CountingDDP(pl.strategies.DDPStrategy):
        # counts the broadcasts that carry the monitor's per-rank results (its gathers)
        ww_broadcasts = 0

        def broadcast(self, obj, src=0):
            if isinstance(obj, dict) and "outputs" in obj:  # this rank's share, sent to the others
                CountingDDP.ww_broadcasts += 1
            return super().broadcast(obj, src)

    if __name__ == "__main__":
        out, mode = sys.argv[1], sys.argv[2]
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(128, 32, generator=g), torch.randint(0, 10, (128,), generator=g))
        cb = ww_monitor.WeightWatcherCallback(
            every_n_epochs=1, blocking=mode == "blocking", figures_every_n_snapshots=None, max_pending=8)
        trainer = pl.Trainer(
            accelerator="cpu", devices=2, strategy=CountingDDP(), max_epochs=3, logger=TensorBoardLogger(out, name="tb",
            version=0), callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, log_every_n_steps=1)
        trainer.fit(Net(), DataLoader(data, batch_size=16))
        with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"rank": trainer.global_rank, "world": trainer.world_size, "steps": cb.history.steps,
                       "layers": cb.history.layer_names, "rank_counts": cb.history.rank_counts(),
                       "here": cb.stats["layers_analysed_here"], "skipped": cb.stats["snapshots_skipped"],
                       "global_step": trainer.global_step,
                       "ww_broadcasts": CountingDDP.ww_broadcasts}, f)
    """
)

LAYERS = [f"layers.{i}" for i in range(6)]


def _checkout_path() -> str:
    """PYTHONPATH that makes a child interpreter import the ww_monitor under test."""
    import ww_monitor

    root = os.path.dirname(os.path.dirname(os.path.abspath(ww_monitor.__file__)))
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


@pytest.mark.parametrize("mode", ["background"])
def test_two_process_ddp_shards_and_gathers(tmp_path, mode):
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(script), str(tmp_path), mode], capture_output=True, text=True,
                         timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps_per_epoch = 128 // 16 // 2
    expected = [0, steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    for info in ranks:
        assert info["world"] == 2 and info["global_step"] == expected[-1] and info["skipped"] == 0
        # results travelled through the Lightning strategy's collectives (at least one sync point per snapshot)
        assert info["ww_broadcasts"] >= len(expected), info
        # every rank holds the same merged history: every layer at every snapshot
        assert info["steps"] == expected and info["layers"] == LAYERS, info
        # both ranks analysed part of every snapshot
        assert info["rank_counts"] == ranks[0]["rank_counts"]
    counts = {int(k): v for k, v in ranks[0]["rank_counts"].items()}
    assert set(counts) == {0, 1} and sum(counts.values()) == len(LAYERS) * len(expected)
    assert ranks[0]["here"] > 0 and ranks[1]["here"] > 0
    assert ranks[0]["here"] + ranks[1]["here"] == len(LAYERS) * len(expected)

    # only rank 0 wrote TensorBoard events, with every layer at every snapshot step
    event_files = [f for f in (tmp_path / "tb" / "version_0").iterdir() if f.name.startswith("events.")]
    assert len(event_files) == 1
    acc = read_events(tmp_path / "tb" / "version_0")
    for layer in LAYERS:
        assert scalar_steps(acc, f"ww/alpha/{layer}") == expected
        assert [h.step for h in acc.Histograms(f"ww/esd/{layer}")] == expected
    assert scalar_steps(acc, "ww/summary/alpha") == expected


FSDP_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys
    import torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch import nn

    def run(rank, world, port, out):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from ww_monitor.analysis.analyze import AnalysisConfig, select_matrices
        from ww_monitor.monitoring.distributed import collect_into
        from ww_monitor.monitoring.snapshot import SnapshotBuilder

        report = {}
        for use_orig in (True, False):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 40)),
                                  nn.Conv1d(4, 8, 3))
            reference = {m.name: m.weight.clone() for m in select_matrices(model, AnalysisConfig())[0]}
            fsdp = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), use_orig_params=use_orig,
                        device_id=torch.device("cpu"))
            builder = SnapshotBuilder(0, 0, 0)
            owners, skipped = collect_into(builder, fsdp, AnalysisConfig(), rank, world, root=fsdp)
            mine = {m.name: m.weight for m in builder.finish().matrices()}
            report[str(use_orig)] = {
                "owners": owners, "mine": sorted(mine), "reference": sorted(reference),
                "equal": all(torch.equal(w, reference[n]) for n, w in mine.items()),
                "resharded": all(p.ndim == 1 for p in fsdp.parameters()),
            }
            del fsdp, model
        with open(f"{out}/fsdp{rank}.json", "w") as f:
            json.dump(report, f)
        # Gloo aborts the process (SIGABRT) if one rank tears down while its peer still has
        # transfers in flight (pytorch/pytorch#190489): meet at a barrier first.
        dist.barrier()
        dist.destroy_process_group()

    if __name__ == "__main__":
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        mp.spawn(run, args=(2, port, sys.argv[1]), nprocs=2)
    """
)


def test_fsdp_snapshot_summons_units_and_shards_ownership(tmp_path):
    """FSDP on CPU/gloo (Lightning's FSDPStrategy needs a GPU, so plain torch here)."""
    script = tmp_path / "fsdp_script.py"
    script.write_text(FSDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=_checkout_path())
    res = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                         timeout=240, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    reports = [json.loads((tmp_path / f"fsdp{r}.json").read_text()) for r in (0, 1)]
    for mode in ("True", "False"):  # use_orig_params
        r0, r1 = reports[0][mode], reports[1][mode]
        assert r0["owners"] == r1["owners"]  # every rank computes the same ownership
        assert sorted(r0["owners"]) == r0["reference"] == ["0", "2.0", "2.1", "3"]  # wrapper names stripped
        assert r0["mine"] and r1["mine"] and sorted(r0["mine"] + r1["mine"]) == r0["reference"]
        assert r0["equal"] and r1["equal"]  # the full weights, copied exactly
        assert r0["resharded"] and r1["resharded"]  # and sharded again afterwards
