"""Spectral monitoring in a plain PyTorch loop (no Lightning, no Trainer): ``ww_monitor.Monitor``.

    python examples/plain_loop.py --logdir tb_logs --steps 300
    tensorboard --logdir tb_logs

Trains a small MLP on synthetic data; the monitor takes a baseline snapshot at the first step,
one every ``--every`` steps and a final one at ``close``, analysed in a background thread, and
writes ``ww/alpha/<layer>``, ``ww/summary/*``, ESD histograms ``ww/esd/<layer>`` and the layer
table to the ``SummaryWriter``. The same two calls work in a Lightning Fabric loop.

``--balance tempbalance`` (or ``alphadecay``) also balances the layers' learning rates (weight
decays) from the monitor's alphas, every ``--every`` steps (``ww_monitor.balancing.loop``): the
factors go to the same ``SummaryWriter`` as ``ww/balance/<layer>`` (``ww/balance_wd/<layer>``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import ww_monitor
from ww_monitor.balancing.loop import AlphaDecay, TempBalance

BALANCERS = {"tempbalance": TempBalance, "alphadecay": AlphaDecay}


def main(argv=None) -> ww_monitor.Monitor:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logdir", default="tb_logs/plain_loop")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="snapshot every this many steps")
    p.add_argument("--on-lag", default="skip", choices=["skip", "wait"],
                   help="when the analysis is behind: skip the snapshot (never blocks training) or wait for it")
    p.add_argument("--every-snapshot", action="store_true",
                   help="take every scheduled snapshot (max_overhead=None); by default the cost budget may "
                        "defer some in a run this short")
    p.add_argument("--balance", choices=sorted(BALANCERS), default=None,
                   help="also balance per-layer learning rates (tempbalance) or weight decays (alphadecay)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    layers = [nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU()]
    if args.balance:  # three layers between the first and the last (which keep factor 1)
        layers += [nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(layers[-2].out_features, 10))
    weight_decay = 5e-4 if args.balance == "alphadecay" else 0.0  # AlphaDecay scales the weight decay there is
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=weight_decay)
    teacher = nn.Linear(64, 10)  # synthetic labels: a fixed random teacher
    writer = SummaryWriter(args.logdir)
    budget = {"max_overhead": None} if args.every_snapshot else {}
    monitor = ww_monitor.Monitor(writer, every_n_steps=args.every, on_lag=args.on_lag, **budget)
    balancer = None
    if args.balance:
        monitor.step(model, 0)  # the baseline before the first step, shared with the balancer's train start
        balancer = BALANCERS[args.balance](every_n_epochs=None, every_n_train_steps=args.every)
        balancer.attach(model, optimizer, monitor=monitor)  # factors go to the monitor's writer

    step = 0
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 64)
        with torch.no_grad():
            y = teacher(x).argmax(dim=1)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        writer.add_scalar("train/loss", loss.item(), step)
        if monitor.step(model, step):  # True once an alert whose action is "stop" fired
            break
        if balancer is not None:
            balancer.step(step)  # after the monitor's step: its newest analysis is used
    monitor.close(model, step)
    if balancer is not None:
        balancer.close()
    writer.close()

    df = monitor.history.to_pandas()
    print(f"{len(monitor.history)} snapshots at steps {monitor.history.steps}")
    print(df[df.step == df.step.max()][["name", "alpha", "stable_rank"]].to_string(index=False))
    if balancer is not None:
        last = balancer.history[-1]
        print(f"{type(balancer).__name__}: updates at steps {[r.step for r in balancer.history]}; "
              f"the latest from {last.source} (first and last layer keep 1):")
        for name, alpha, factor in zip(last.layers, last.alphas, last.factors):
            print(f"  {name:<4} alpha {alpha:6.3f}  factor {factor:.3f}")
    print(f"tensorboard --logdir {args.logdir}")
    return monitor


if __name__ == "__main__":
    main()
