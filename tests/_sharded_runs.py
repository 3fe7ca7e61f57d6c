"""Two gloo ranks on CPU, one process group, several sharding strategies in turn (run by
tests/test_sharded.py as ``python _sharded_runs.py OUT``; each rank writes OUT/<strategy>.rank<r>.json).

For every strategy: the sharded model and an unsharded replica with the same weights.

* **collect**: the snapshot each rank takes (``collect_into``) holds exactly the replica's weights
  for the layers it owns; their analysis (every metric, eigenvalues) is the replica's; ownership
  is computed before any gather and (DTensor, ZeRO-3) equals the replica's; the model is left as
  it was (same local shards, placements, parameter objects); the bytes the per-layer gather
  materialised at once never exceed the largest layer.
* **monitor**: ``ww_monitor.Monitor`` on the sharded model and on the replica (its weights copied
  from the sharded model at each snapshot step), 1 training step, 2 snapshots; rank 0 writes
  TensorBoard events for the sharded run (read back by the test) and both histories. A few
  layers are frozen: analysed at the first snapshot, carried forward (not gathered) after.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

VOCAB, WIDTH, HIDDEN, RANK_R = 50, 24, 63, 8
STRATEGIES = ("fsdp2", "tp", "fsdp2_tp", "fsdp1", "zero3")


class Zoo(nn.Module):
    """Every layer type the finder knows, shapes that do not split evenly over 2 ranks, a tied head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, 3)
        self.rnn = nn.LSTM(WIDTH, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.fc = nn.Linear(WIDTH, HIDDEN)
        self.proj = nn.Linear(HIDDEN, WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):  # (T, B)
        x = self.emb(tokens)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.rnn(x)[0]
        x = x + self.conv(x.permute(1, 2, 0)).permute(2, 0, 1)
        return self.head(x + self.proj(torch.relu(self.fc(x))))


class MLP(nn.Module):
    """The tensor-parallel model: an embedding and Linear layers (Colwise / Rowwise pairs; tensor
    parallelism needs the sharded dimensions to divide evenly)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, 64)
        self.down = nn.Linear(64, WIDTH)
        self.up2 = nn.Linear(WIDTH, 40)
        self.down2 = nn.Linear(40, WIDTH)
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens)
        x = x + self.down(torch.relu(self.up(x)))
        x = x + self.down2(torch.relu(self.up2(x)))
        return self.out(x)


#: Layers left frozen (``requires_grad=False``): the monitor analyses them once and carries them forward.
FROZEN = {"zoo": ("conv", "proj.base_layer"), "mlp": ("up2",)}


def build(strategy: str) -> nn.Module:
    torch.manual_seed(0)
    if strategy in ("tp", "fsdp2_tp"):
        model, frozen = MLP(), FROZEN["mlp"]
    else:
        import peft

        model = peft.get_peft_model(Zoo(), peft.LoraConfig(r=RANK_R, lora_alpha=16, target_modules=["proj"]))
        frozen = tuple(f"base_model.model.{name}" for name in FROZEN["zoo"])
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter (B starts at zero)
            nn.init.normal_(p, std=0.02)
        p.requires_grad_(not name.startswith(frozen))  # train the rest, base weights included
    return model


def apply_fsdp2(model: nn.Module, mesh) -> None:
    """``fully_shard`` each layer of the Zoo (LoRA factors and the tied head stay in the root's group), then the root."""
    from torch.distributed.fsdp import fully_shard

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.LSTM, nn.MultiheadAttention)) and "lora" not in name \
                and not name.endswith(("out_proj", "head")):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def dump_history(history) -> dict:
    """A history as JSON: steps, layers, and per snapshot the layers, ranks and metric values (NaN as None)."""
    return {"steps": history.steps, "layers": history.layer_names,
            "records": [{"step": r.step, "layers": list(r.layers), "ranks": list(r.ranks),
                         "values": [[None if math.isnan(v) else v for v in row] for row in r.values.tolist()]}
                        for r in history]}


def shard(strategy: str, model: nn.Module, world: int):
    """``(model to train and watch, optimizer)`` under ``strategy``."""
    from torch.distributed.device_mesh import init_device_mesh

    if strategy == "fsdp2":
        apply_fsdp2(model, init_device_mesh("cpu", (world,)))
    elif strategy in ("tp", "fsdp2_tp"):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        plan = {"up": ColwiseParallel(), "down": RowwiseParallel(), "up2": ColwiseParallel(),
                "down2": RowwiseParallel(), "out": ColwiseParallel(output_layouts=Replicate())}
        if strategy == "tp":
            emb = RowwiseParallel(input_layouts=Replicate())  # the token ids are whole on every rank
            parallelize_module(model, init_device_mesh("cpu", (world,)), {"emb": emb, **plan})
        else:  # 2-D mesh (data parallel 1 x tensor parallel 2): TP, then FSDP2 over the dp dimension
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
            parallelize_module(model, mesh["tp"], plan)
            for m in (model.up, model.down, model.out):
                fully_shard(m, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
    elif strategy == "fsdp1":
        from functools import partial

        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        head = model.get_base_model().head

        def unit(m: nn.Module) -> bool:  # every Linear (LoRA base, A and B apart) and the conv; not the
            # attention's out_proj (its weight is read by the attention itself) nor the tied head
            return isinstance(m, (nn.Linear, nn.Conv1d)) and m is not head \
                and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)

        model = FSDP(model, auto_wrap_policy=partial(lambda_auto_wrap_policy, lambda_fn=unit), use_orig_params=True,
                     device_id=torch.device("cpu"))
    elif strategy == "zero3":
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
                  # threshold 0: every parameter is partitioned (tiny ones would stay whole otherwise)
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05), config=config)
        return engine, optimizer
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def full_state(strategy: str, model: nn.Module) -> dict:
    """The sharded model's full weights, on every rank (collective)."""
    if strategy == "zero3":
        import deepspeed

        params = list(model.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    if strategy == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        with FSDP.summon_full_params(model, writeback=False):
            return {k.replace("_fsdp_wrapped_module.", ""): v.detach().clone() for k, v in model.named_parameters()}
    state = model.state_dict()
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}


def train_step(strategy: str, model, optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (6, 4), generator=g)  # the same batch on both ranks
    out = model(tokens)
    loss = nn.functional.cross_entropy(out.reshape(-1, VOCAB), tokens.reshape(-1))
    if strategy == "zero3":
        model.backward(loss)
        model.step()
        return
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-10 * max(1.0, abs(b))


def _result_mismatches(results, reference) -> list[str]:
    """Fields of the analysis (every metric, eigenvalues) that differ from the reference by more than 1e-10."""
    from ww_monitor.analysis.results import LAYER_COLUMNS

    ref = {r.name: r for r in reference}
    bad = []
    for r in results:
        e = ref.get(r.name)
        if e is None:
            bad.append(f"{r.name}: not in the reference")
            continue
        for col in LAYER_COLUMNS:
            a, b = getattr(r, col), getattr(e, col)
            if isinstance(a, (int, float)) and not isinstance(a, bool):
                if not _close(float(a), float(b)):
                    bad.append(f"{r.name}.{col}: {a} != {b}")
            elif a != b:
                bad.append(f"{r.name}.{col}: {a!r} != {b!r}")
        ea, eb = r.eigenvalues, e.eigenvalues
        if ea is None or eb is None or ea.shape != eb.shape or not all(_close(x, y) for x, y in zip(ea, eb)):
            bad.append(f"{r.name}.eigenvalues")
    return bad


def _local_state(model) -> list:
    out = []
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p.data)  # ZeRO-3: its partition
        out.append((name, id(p), str(getattr(p, "placements", "")), local.detach().clone()))
    return out


def check_collect(strategy, model, replica, config, rank, world) -> dict:
    from ww_monitor.analysis.analyze import analyze_matrices, select_matrices
    from ww_monitor.monitoring.distributed import assign_owners, collect_into, matrix_cost
    from ww_monitor.monitoring.sharded import iter_full_matrices, plan_sharded
    from ww_monitor.monitoring.snapshot import SnapshotBuilder

    watched = model.module if strategy == "zero3" else model
    reference, _ = select_matrices(replica, config)
    ref_weights = {m.name: m.weight.detach() for m in reference}
    plain_owners = dict(zip((m.name for m in reference), assign_owners([matrix_cost(m) for m in reference], world)))
    before = _local_state(model)
    report = {}
    if strategy != "fsdp1":  # FSDP1 units are gathered before their shapes are known
        report["owners_before_gather"] = collect_into(None, watched, config, rank, world)[0]
    builder = SnapshotBuilder(0, 0, 0)
    owners, _ = collect_into(builder, watched, config, rank, world)
    mine = builder.finish().matrices()
    report.update(owners=owners, plain_owners=plain_owners, mine=sorted(m.name for m in mine),
                  reference=sorted(ref_weights),
                  unequal_weights=[m.name for m in mine if not torch.equal(m.weight, ref_weights[m.name])])
    results, _ = analyze_matrices(mine, config)
    ref_results, _ = analyze_matrices([m for m in reference if owners.get(m.name) == rank], config)
    report["analysed"] = sorted(r.name for r in results)
    report["result_mismatches"] = _result_mismatches(results, ref_results)
    after = _local_state(model)
    report["model_unchanged"] = len(before) == len(after) and all(
        a[:3] == b[:3] and torch.equal(a[3], b[3]) for a, b in zip(before, after))
    if strategy != "fsdp1":
        report["failed_copy"] = failed_copy(watched, config, rank, world)
    if strategy != "fsdp1":  # the per-layer gather's own bookkeeping
        plan = plan_sharded(watched, config)
        names = [m.name for m in plan.matrices]
        plan_owners = dict(zip(names, assign_owners([matrix_cost(m) for m in plan.matrices], world)))
        for m in iter_full_matrices(plan, owner=lambda m: plan_owners[m.name], rank=rank):
            del m  # what collect_into does once it has copied it
        read = plan.materialiser
        # frozen matrices carried forward have no owner: their layers are not gathered
        carried = plan_sharded(watched, config)
        report["frozen"] = sorted(m.name for m in carried.matrices if m.frozen)
        report["walked_without_frozen"] = []
        for m in iter_full_matrices(carried, owner=lambda m: None if m.frozen else plan_owners[m.name], rank=rank):
            report["walked_without_frozen"].append(m.name)
            del m
        report.update(gathers_without_frozen=carried.materialiser.gathers,
                      mine_without_frozen=sorted(n for n, r in plan_owners.items() if r == rank
                                                 and n not in report["frozen"]))
        layer_bytes = {}
        for name, p in replica.named_parameters():
            layer_bytes[name.rpartition(".")[0]] = layer_bytes.get(name.rpartition(".")[0], 0) + p.numel() * 4
        report.update(peak_bytes=read.peak_bytes, live_bytes=read.live_bytes, gathers=read.gathers,
                      largest_layer_bytes=max(layer_bytes.values()),
                      model_bytes=sum(p.numel() * 4 for p in replica.parameters()))
    return report


def failed_copy(model, config, rank, world) -> str:
    """A copy that fails on rank 0 only: rank 0 still takes part in every gather (else rank 1
    would wait for it forever) and raises afterwards; rank 1 finishes normally."""
    from ww_monitor.monitoring.distributed import collect_into
    from ww_monitor.monitoring.snapshot import SnapshotBuilder

    class Failing(SnapshotBuilder):
        def fill(self, m):
            if rank == 0:
                raise RuntimeError("copy failed")
            super().fill(m)

    try:
        collect_into(Failing(0, 0, 0), model, config, rank, world)
    except RuntimeError as err:
        return str(err)
    finally:
        dist.barrier()
    return "no error"


def run_monitor(strategy, model, optimizer, replica, options, rank, out) -> dict:
    import ww_monitor

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out, f"tb_{strategy}"))
    watched = model.module if strategy == "zero3" else model
    sharded = ww_monitor.Monitor(writer, every_n_steps=1, **options)
    plain = ww_monitor.Monitor(None, every_n_steps=1, **options)
    for step in range(2):
        if step:
            train_step(strategy, model, optimizer, step)
        sharded.step(watched, step)
        missing, unexpected = replica.load_state_dict(full_state(strategy, model), strict=False)
        assert not unexpected and all(k.endswith("head.weight") for k in missing), (missing, unexpected)  # tied
        plain.step(replica, step)
    sharded.close(watched, 1)
    plain.close(replica, 1)
    if writer is not None:
        writer.close()
    return {"sharded": dump_history(sharded.history), "plain": dump_history(plain.history),
            "here": sharded.stats["layers_analysed_here"]}


def run(rank: int, world: int, port: int, out: str, strategies: list[str]) -> None:
    start_group(rank, world, port)
    from ww_monitor.analysis.analyze import AnalysisConfig

    options = dict(blocking=True, figures_every_n_snapshots=None, peft="with_base", alerts=False, max_overhead=None)
    config = AnalysisConfig(peft="with_base")
    for strategy in strategies:
        report: dict = {}
        t0 = time.perf_counter()
        try:
            if strategy == "zero3":
                deepspeed_on_cpu()
            replica = build(strategy)
            model, optimizer = shard(strategy, build(strategy), world)
            report["collect"] = check_collect(strategy, model, replica, config, rank, world)
            report["monitor"] = run_monitor(strategy, model, optimizer, replica, options, rank, out)
        except ImportError as err:
            report = {"unavailable": f"{type(err).__name__}: {err}"}
        except Exception:
            report["error"] = traceback.format_exc()
        report["seconds"] = time.perf_counter() - t0
        with open(os.path.join(out, f"{strategy}.rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.barrier()
    end_group()


def deepspeed_on_cpu() -> None:
    """DeepSpeed with gloo collectives, without JIT-compiling its shared-memory op (needs a compiler)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}


def start_group(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)


def end_group() -> None:
    dist.barrier()  # gloo aborts a process whose peer tears down with transfers in flight: meet first
    dist.destroy_process_group()


def spawn(run, names) -> None:
    """``python SCRIPT OUT [name,name...]``: ``run(rank, 2, port, OUT, names)`` on 2 processes."""
    out_dir = sys.argv[1]
    which = sys.argv[2].split(",") if len(sys.argv) > 2 else list(names)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    free_port = s.getsockname()[1]
    s.close()
    mp.spawn(run, args=(2, free_port, out_dir, which), nprocs=2)


if __name__ == "__main__":
    spawn(run, STRATEGIES)
