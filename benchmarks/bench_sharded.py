"""Memory and time of a snapshot of a sharded model: 2 gloo ranks on CPU, FSDP2 ``fully_shard``.

The model is a stack of large Linear layers (one larger than the rest, so that "one layer" and
"the whole model" are far apart). Each rank takes, in turn:

* **per-layer** (what the monitor does: ``collect_into``): ownership from global shapes, then one
  layer at a time gathered to its owner (``torch.distributed.gather``) and copied if owned;
* **per-layer, all-gather**: the same walk with every layer materialised on every rank
  (``DTensor.full_tensor()``; owners copy, the others drop it), the alternative to gathering to
  the owner alone;
* **whole model** (for scale): every parameter's ``full_tensor()`` held at once, what gathering
  the model on each rank costs.

For each: the peak extra resident memory of the rank during the call (Linux ``VmHWM`` reset
through ``/proc/self/clear_refs`` before it, minus ``VmRSS`` before it; glibc is told to serve
every large allocation from fresh pages, ``MALLOC_MMAP_THRESHOLD_``, so freed layers leave the
resident set), the bytes the gather counted alive at once (:class:`Materialiser`), the bytes
each rank keeps (its snapshot), and the wall time. RSS numbers are for this CPU process only
(on GPUs the gathered layer lives in device memory; the accounting is the same).

Run::

    python benchmarks/bench_sharded.py                  # 8 layers of 2048x2048 and one 4096x2048 (float32)
    python benchmarks/bench_sharded.py --width 1024     # smaller
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

#: Allocations above this many bytes come from their own mapping (and go back to the system when
#: freed), so the resident set follows what is alive; must be set before the ranks start.
MMAP_THRESHOLD = 1 << 20
MIB = 1 << 20


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn):
    """``(result, peak extra resident bytes during fn, seconds)``."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak resident set) to the current resident set
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return out, (_rss_kib("VmHWM") - before) * 1024, seconds


def run(rank: int, world: int, port: int, width: int, layers: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ww_monitor.analysis.analyze import AnalysisConfig
    from ww_monitor.monitoring.distributed import assign_owners, collect_into, matrix_cost
    from ww_monitor.monitoring.sharded import iter_full_matrices, plan_sharded
    from ww_monitor.monitoring.snapshot import SnapshotBuilder

    torch.manual_seed(0)
    shapes = [(width, width)] * layers + [(2 * width, width)]
    model = nn.Sequential(*(nn.Linear(i, o, bias=False) for o, i in shapes))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    config = AnalysisConfig(max_evals=None)
    layer_bytes = [o * i * 4 for o, i in shapes]
    report = {"rank": rank, "model_bytes": sum(layer_bytes), "largest_layer_bytes": max(layer_bytes),
              "local_shard_bytes": sum(p.to_local().numel() * 4 for p in model.parameters())}

    def per_layer(all_gather: bool):
        plan = plan_sharded(model, config)
        owners = dict(zip((m.name for m in plan.matrices),
                          assign_owners([matrix_cost(m) for m in plan.matrices], world)))
        builder = SnapshotBuilder(0, 0, 0)
        builder.reserve([m for m in plan.matrices if owners[m.name] == rank])
        owner = None if all_gather else (lambda m: owners[m.name])
        for m in iter_full_matrices(plan, owner=owner, rank=rank):
            if owners[m.name] == rank:
                builder.fill(m)
            del m
        return builder.finish(), plan.materialiser

    def whole_model():
        return {n: p.full_tensor() for n, p in model.named_parameters()}

    dist.barrier()
    snap, rss, sec = measure(lambda: _collect(collect_into, model, config, rank, world))
    report["collect_into"] = {"peak_extra_rss": rss, "seconds": sec, "snapshot_bytes": snap.nbytes}
    del snap
    for name, all_gather in (("per_layer_to_owner", False), ("per_layer_all_gather", True)):
        dist.barrier()
        (snap, read), rss, sec = measure(lambda: per_layer(all_gather))
        report[name] = {"peak_extra_rss": rss, "seconds": sec, "snapshot_bytes": snap.nbytes,
                        "gather_peak_bytes": read.peak_bytes, "gathered_bytes": read.total_bytes}
        del snap, read
    dist.barrier()
    full, rss, sec = measure(whole_model)
    report["whole_model"] = {"peak_extra_rss": rss, "seconds": sec,
                             "held_bytes": sum(t.numel() * t.element_size() for t in full.values())}
    del full
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def _collect(collect_into, model, config, rank, world):
    from ww_monitor.monitoring.snapshot import SnapshotBuilder

    builder = SnapshotBuilder(0, 0, 0)
    collect_into(builder, model, config, rank, world)
    return builder.finish()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2048, help="layer width (default 2048)")
    ap.add_argument("--layers", type=int, default=8, help="width x width layers before the 2*width x width one")
    args = ap.parse_args(argv)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.multiprocessing as mp

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(run, args=(2, port, args.width, args.layers, out), nprocs=2)
        reports = []
        for r in (0, 1):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                reports.append(json.load(f))
    r0 = reports[0]
    print(f"model: {args.layers} x Linear({args.width}, {args.width}) + Linear({args.width}, {2 * args.width}), "
          f"float32, FSDP2 over 2 gloo ranks")
    print(f"whole model {r0['model_bytes'] / MIB:.0f} MiB, largest layer {r0['largest_layer_bytes'] / MIB:.0f} MiB, "
          f"local shard per rank {r0['local_shard_bytes'] / MIB:.0f} MiB")
    print(f"{'rank':>4} {'method':<22} {'peak extra RSS':>15} {'/ layer':>8} {'/ model':>8} {'kept':>9} "
          f"{'gathered peak':>14} {'seconds':>8}")
    for r in reports:
        for name in ("collect_into", "per_layer_to_owner", "per_layer_all_gather", "whole_model"):
            d = r[name]
            kept = d.get("snapshot_bytes", d.get("held_bytes", 0))
            peak = d.get("gather_peak_bytes")
            print(f"{r['rank']:>4} {name:<22} {d['peak_extra_rss'] / MIB:>11.1f} MiB "
                  f"{d['peak_extra_rss'] / r['largest_layer_bytes']:>8.2f} {d['peak_extra_rss'] / r['model_bytes']:>8.2f} "
                  f"{kept / MIB:>5.0f} MiB {'' if peak is None else f'{peak / MIB:>10.0f} MiB':>14} "
                  f"{d['seconds']:>8.3f}")


if __name__ == "__main__":
    sys.exit(main())
