"""``ww_monitor.huggingface.WeightWatcherCallback`` under ``torchrun --nproc_per_node 2`` (gloo, CPU):
the layers are shared between the ranks, gathered, and every layer is logged once per snapshot."""

import json
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_huggingface import Synthetic, tiny_bert
    import transformers
    from ww_monitor.huggingface import WeightWatcherCallback

    out = sys.argv[1]
    ww = WeightWatcherCallback(every_n_steps=2, every_n_epochs=None, blocking=True, figures_every_n_snapshots=None,
                               summary_include_unreliable=True, tensorboard=True,
                               tensorboard_dir=os.path.join(out, "tb"))
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=4, per_device_train_batch_size=4, save_steps=1000, logging_steps=1000,
        report_to="none", use_cpu=True, disable_tqdm=True, ddp_backend="gloo", seed=0)
    transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Synthetic(), callbacks=[ww]).train()
    df = ww.history.to_pandas()
    rank = dist.get_rank() if dist.is_initialized() else -1
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"steps": ww.history.steps, "layers": sorted(set(df.name)),
                   "ranks": sorted(set(int(r) for r in df["rank"])) if "rank" in df else [],
                   "here": ww.stats["layers_analysed_here"]}}, f)
''')


def test_torchrun_two_processes_log_every_layer_once(tmp_path):
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], capture_output=True, text=True, timeout=200,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == [0, 2, 4]
    assert r0["layers"] == r1["layers"] and len(r0["layers"]) >= 6
    assert r0["here"] > 0 and r1["here"] > 0  # both ranks analysed a share

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    for layer in r0["layers"]:
        assert [e.step for e in acc.Scalars(f"ww/alpha/{layer}")] == [0, 2, 4], layer
        assert [e.step for e in acc.Histograms(f"ww/esd/{layer}")] == [0, 2, 4], layer
