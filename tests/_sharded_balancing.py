"""Balancers on sharded models: two gloo ranks on CPU, one process group, several setups in turn
(run by tests/test_balancing_sharded.py as ``python _sharded_balancing.py OUT``; each rank writes
OUT/<setup>.rank<r>.json). Models, sharding and training steps are tests/_sharded_runs.py's.

* ``fsdp2`` / ``fsdp1`` / ``tp`` / ``fsdp2_tp`` (2-D mesh): the plain-loop ``TempBalance`` (lr, every 2 steps) and
  ``AlphaDecay`` (weight decay, every step) on one optimizer (SGD, momentum, weight decay, StepLR)
  of the sharded model, and the same on an unsharded replica with the same weights and batches.
  Recorded: both histories, the lr / weight decay / parameters of every group each optimizer step
  ran with, which matrices each rank decomposed, the final full weights' distance to the replica's.
* ``monitor``: FSDP2 (on the tensor-parallel runs' MLP, whose layers the monitor names as the
  balancers do) with a ``ww_monitor.Monitor`` on the sharded model; ``TempBalance`` takes its
  alphas from the monitor's snapshots (no eigensolve of its own), an ``AlphaDecay`` without
  the monitor decomposes the same weights.
* ``zero3`` / ``zero2`` / ``fsdp1_flat``: attaching raises ``WWMonitorError`` (DeepSpeed ZeRO-3 and
  ZeRO-2, the latter inside accelerate's wrapper as the Hugging Face Trainer hands it to callbacks:
  their optimizers step flattened partitions; FSDP with ``use_orig_params=False``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _sharded_runs import (
    apply_fsdp2,
    build,
    deepspeed_on_cpu,
    end_group,
    full_state,
    shard,
    spawn,
    start_group,
    train_step,
)

SETUPS = ("fsdp2", "fsdp1", "tp", "fsdp2_tp", "monitor", "zero3", "zero2", "fsdp1_flat")
STEPS = 4
LR, GAMMA, STEP_SIZE, WD = 0.05, 0.5, 2, 1e-3
#: The models' layers have 8 to 72 eigenvalues; the papers' 50 would leave most at factor 1.
OPTIONS = dict(min_evals=8, every_n_epochs=None)


def _names(model: nn.Module) -> dict[int, str]:
    from ww_monitor.monitoring.distributed import strip_wrapper_names

    return {id(p): strip_wrapper_names(n) for n, p in model.named_parameters()}


def _balancers(model, optimizer, monitor=None):
    from ww_monitor.balancing.loop import AlphaDecay, TempBalance

    tb = TempBalance(every_n_train_steps=2, **OPTIONS).attach(model, optimizer, monitor=monitor)
    ad = AlphaDecay(every_n_train_steps=1, use_monitor=False, **OPTIONS).attach(model, optimizer)
    return tb, ad


def _probe(optimizer, names: dict[int, str], seen: list) -> None:
    """After the balancers' hooks: the groups each step runs with (lr, weight decay, parameter names)."""
    optimizer.register_step_pre_hook(lambda o, a, k: seen.append(
        [(g["lr"], g["weight_decay"], sorted(names[id(p)] for p in g["params"])) for g in o.param_groups]))


def train(strategy: str, model, optimizer, monitor=None) -> dict:
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=STEP_SIZE, gamma=GAMMA)
    if monitor is not None:
        monitor.step(model, 0)
    tb, ad = _balancers(model, optimizer, monitor)
    seen: list = []
    _probe(optimizer, _names(model), seen)
    for step in range(1, STEPS + 1):
        train_step(strategy, model, optimizer, step)
        scheduler.step()
        if monitor is not None:
            monitor.step(model, step)
        tb.step(step)
        ad.step(step)
    tb.close()
    ad.close()
    units = {u.name: sorted(_names(model)[id(p)] for p in u.params) for u in tb._find_units(model)}
    return {"lr": tb.history.state_dict(), "wd": ad.history.state_dict(), "seen": seen, "units": units,
            "failures": tb.stats["failures"] + ad.stats["failures"], "groups": len(optimizer.param_groups),
            "owned": {"lr": getattr(tb._source, "last_owned", None), "wd": getattr(ad._source, "last_owned", None)},
            "peak_bytes": getattr(tb._source, "last_peak_bytes", None),
            "matrices": sorted(m.name for u in tb._find_units(model) for m in u.matrices)}


def run_balanced(strategy: str, world: int) -> dict:
    model, _ = shard(strategy, build(strategy), world)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    report = {"sharded": train(strategy, model, optimizer)}
    replica = build(strategy)
    report["plain"] = train("plain", replica, torch.optim.SGD(replica.parameters(), lr=LR, momentum=0.9,
                                                              weight_decay=WD))
    full, ref = full_state(strategy, model), replica.state_dict()
    report["max_weight_diff"] = max(float((full[k] - ref[k]).abs().max()) for k in full if k in ref)
    report["compared"] = sum(k in ref for k in full)
    layer_bytes: dict[str, int] = {}
    for name, p in replica.named_parameters():
        layer = name.rpartition(".")[0]
        layer_bytes[layer] = layer_bytes.get(layer, 0) + p.numel() * p.element_size()
    report["largest_layer_bytes"] = max(layer_bytes.values())
    return report


def run_monitor(world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    import ww_monitor

    model = build("tp")
    apply_fsdp2(model, init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=WD)
    monitor = ww_monitor.Monitor(None, every_n_steps=1, blocking=True, figures_every_n_snapshots=None, alerts=False,
                                 max_overhead=None, peft="with_base", watch_frozen=True)
    report = train("fsdp2", model, optimizer, monitor)
    monitor.close(model, STEPS)
    report["monitor_steps"] = monitor.history.steps
    return report


def expect_error(strategy: str, world: int) -> dict:
    from ww_monitor.balancing.loop import TempBalance
    from ww_monitor.errors import WWMonitorError

    if strategy == "fsdp1_flat":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        torch.manual_seed(0)
        model = FSDP(nn.Sequential(nn.Linear(24, 64), nn.ReLU(), nn.Linear(64, 24)), use_orig_params=False,
                     device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    elif strategy == "zero2":
        import deepspeed

        deepspeed_on_cpu()
        config = {"train_micro_batch_size_per_gpu": 4, "zero_allow_untested_optimizer": True,
                  "zero_optimization": {"stage": 2}}
        model = build("tp")
        model, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                                      config=config)
        from accelerate import Accelerator
        from accelerate.utils.deepspeed import DeepSpeedOptimizerWrapper

        Accelerator(cpu=True)  # the wrapper reads accelerate's state
        optimizer = DeepSpeedOptimizerWrapper(optimizer)  # as the Hugging Face Trainer hands it to callbacks
    else:
        deepspeed_on_cpu()
        model, optimizer = shard(strategy, build(strategy), world)
    try:
        TempBalance().attach(model, optimizer)
    except WWMonitorError as err:
        return {"raised": str(err)}
    return {"raised": None}


def run(rank: int, world: int, port: int, out: str, setups: list[str]) -> None:
    start_group(rank, world, port)
    for setup in setups:
        t0 = time.perf_counter()
        try:
            if setup == "monitor":
                report = run_monitor(world)
            elif setup in ("zero3", "zero2", "fsdp1_flat"):
                report = expect_error(setup, world)
            else:
                report = run_balanced(setup, world)
        except ImportError as err:
            report = {"unavailable": f"{type(err).__name__}: {err}"}
        except Exception:
            report = {"error": traceback.format_exc()}
        report["seconds"] = time.perf_counter() - t0
        with open(os.path.join(out, f"{setup}.rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.barrier()
    end_group()


if __name__ == "__main__":
    spawn(run, SETUPS)
