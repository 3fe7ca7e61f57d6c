"""The plain-loop and Hugging Face balancers under ``torchrun --nproc_per_node 2`` (gloo, CPU): rank 0
computes, every rank applies the same factors; a collective weight source (what a sharded model
gets) is read by every rank in step, each rank decomposing the matrices it yields to that rank.
One torchrun runs all parts (sharded models: tests/test_balancing_sharded.py)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch import nn
    sys.path.insert(0, {tests!r})
    import transformers
    from ww_monitor.balancing import hill_alpha
    from ww_monitor.balancing.loop import TempBalance
    from ww_monitor.huggingface import TempBalance as HFTempBalance
    from test_huggingface import Synthetic, tiny_bert

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    class Gathering:
        """A collective weight source, one layer at a time (as a sharded gather is): each read is
        an all_reduce, so a rank that did not read along would hang the others; each matrix is
        yielded to one rank (round robin), which decomposes it."""
        collective = True

        def __init__(self):
            self.reads, self.mine = 0, []

        def __call__(self, matrices):
            for i, m in enumerate(matrices):
                w = m.weight.detach().clone()
                dist.all_reduce(w)
                self.reads += 1
                if i % world == rank:
                    self.mine.append(m.name)
                    yield [(m, w / world)]

    # plain loop: DDP model, per-rank data, StepLR
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 80),
                        nn.ReLU(), nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 10))
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    tb = TempBalance(every_n_epochs=None, every_n_train_steps=3)
    tb.weight_source = source = Gathering()
    tb.attach(model, opt)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([g["lr"] for g in o.param_groups]))
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 10):
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        tb.step(step)
    tb.close()
    with torch.no_grad():
        oracle = [hill_alpha(torch.linalg.svdvals(m.weight.double()).square().numpy())
                  for m in net if isinstance(m, nn.Linear)]
    loop = {{"history": tb.history.state_dict(), "seen": seen, "layers": tb.group_layers(), "reads": source.reads,
             "mine": source.mine, "failures": tb.stats["failures"],
             "weights": [float(p.sum()) for p in net.parameters()], "oracle": oracle}}

    # Hugging Face Trainer (accelerate uses the process group above)
    probe_seen = []

    class Probe(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            optimizer.optimizer.register_step_pre_hook(lambda o, a, k: probe_seen.append(
                (state.global_step, [g["lr"] for g in o.param_groups])))

    hf = HFTempBalance(every_n_epochs=None, every_n_train_steps=2)
    args = transformers.TrainingArguments(
        output_dir=os.path.join(out, "hf"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
        warmup_steps=2, save_steps=1000, logging_steps=1000, report_to="none", use_cpu=True, disable_tqdm=True,
        ddp_backend="gloo", seed=0)
    trainer = transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Synthetic(), callbacks=[hf, Probe()])
    trainer.train()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    ref_sched = transformers.get_linear_schedule_with_warmup(opt, 2, 6)
    ref = []
    for _ in range(7):
        ref.append(opt.param_groups[0]["lr"])
        opt.step()
        ref_sched.step()
    huggingface = {{"history": hf.history.state_dict(), "seen": probe_seen, "layers": hf.group_layers(),
                   "failures": hf.stats["failures"], "ref": ref}}
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump({{"loop": loop, "hf": huggingface}}, f)
    # Tear the process group down before the interpreter exits: left to exit-time destructors,
    # gloo's threads can abort the process ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("balance_ddp")
    script = out / "train.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).resolve().parent)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(out)], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def factors_at(records, step):
    return [r for r in records if r["step"] <= step][-1]


def test_plain_loop_two_ranks_apply_rank_zeros_factors(ranks):
    r0, r1 = (r["loop"] for r in ranks)
    records = r0["history"]["records"]
    assert [r["step"] for r in records] == [0, 3, 6, 9]
    assert r0["history"] == r1["history"] and r0["failures"] == r1["failures"] == 0
    assert r0["layers"] == r1["layers"] == ["0", "2", "4", "6", "8"]  # DDP's "module." is not part of the names
    # every rank read every layer's weight at every update, in step (5 layers x 4 updates), and
    # decomposed the ones yielded to it (3 and 2 of the 5 at each update)
    assert r0["reads"] == r1["reads"] == 5 * 4
    assert r0["mine"] == ["0", "4", "8"] * 4 and r1["mine"] == ["2", "6"] * 4
    assert any(f != 1.0 for r in records for f in r["factors"])
    assert records[-1]["alphas"] == pytest.approx(r0["oracle"], rel=1e-6)  # the gathered weights, decomposed
    assert r0["seen"] == r1["seen"] and len(r0["seen"]) == 9
    for k, lrs in enumerate(r0["seen"]):
        scheduled = 0.1 * 0.5 ** (k // 3)  # StepLR(step_size=3, gamma=0.5), stepped per step
        assert lrs == pytest.approx([f * scheduled for f in factors_at(records, k)["factors"]], rel=1e-12)
    assert r0["weights"] == r1["weights"]  # the replicas stayed identical under per-layer lrs


def test_huggingface_two_ranks_apply_rank_zeros_factors(ranks):
    r0, r1 = (r["hf"] for r in ranks)
    records = r0["history"]["records"]
    assert [r["step"] for r in records] == [0, 2, 4, 6]
    assert r0["history"] == r1["history"] and r0["failures"] == r1["failures"] == 0
    assert r0["seen"] == r1["seen"] and [s for s, _ in r0["seen"]] == list(range(6))
    assert any(f != 1.0 for r in records for f in r["factors"])
    for step, lrs in r0["seen"]:
        factors = dict(zip(*[factors_at(records, step)[k] for k in ("layers", "factors")]))
        assert lrs == pytest.approx([factors.get(n, 1.0) * r0["ref"][step] for n in r0["layers"]], rel=1e-12,
                                    abs=1e-18)
