"""GPU analysis path: eigensolver times per shape, 1B/7B-shaped stacks, callback overhead; one table.

Three parts, every number a median of interleaved repeats, timed with device synchronisation:

1. **Solvers per shape**: ``torch.linalg.eigvalsh`` of the Gram matrix and ``torch.linalg.svdvals``,
   float32 vs float64, one matrix vs a batch of 4 (per matrix).
2. **Model-shaped stacks** of random bf16 matrices as the callback analyses them
   (:func:`ww_monitor.monitoring.analysis_job.analyze_on_device`: streamed groups, low-priority stream, only
   eigenvalues to the host): a 1B-shaped decoder (2048 wide, FFN 8192, 16 layers) and a
   7B-shaped one (4096 wide, FFN 11008, 32 layers). ``--layers`` of each are analysed and the
   per-snapshot time is scaled to the full depth (marked "x depth").
3. **Callback overhead** on a GPU training loop: a small MLP trained with Lightning for
   ``--steps`` steps without the callback and with ``WeightWatcherCallback(every_n_train_steps=...)``
   (``analysis_device="auto"``), wall-clock per step.

Run::

    python benchmarks/bench_gpu.py              # on a GPU, < 10 minutes
    python benchmarks/bench_gpu.py --cpu        # reduced shapes on the CPU (seconds; the test suite runs it)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

GPU_SHAPES = [(768, 768), (3072, 768), (4096, 4096), (11008, 4096)]
CPU_SHAPES = [(64, 64), (192, 64)]
#: (label, width, ffn, depth) of the decoder-shaped stacks (q, k, v, o: width^2; gate, up, down: ffn x width).
STACKS = [("1B-shaped", 2048, 8192, 16), ("7B-shaped", 4096, 11008, 32)]
CPU_STACKS = [("tiny-shaped", 64, 160, 2)]
BATCH = 4


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats: int) -> float:
    fn()  # warm-up (cuSOLVER handles, workspaces)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def solver_rows(device, shapes, repeats):
    rows = []
    for n, m in shapes:
        w = torch.randn(BATCH, n, m, device=device)
        for dtype in (torch.float32, torch.float64):
            a = w.to(dtype)
            one = a[0]
            eig1 = _timed(lambda: torch.linalg.eigvalsh(one.T @ one), device, repeats)
            eigb = _timed(lambda: torch.linalg.eigvalsh(a.transpose(-1, -2) @ a), device, repeats) / BATCH
            svd1 = _timed(lambda: torch.linalg.svdvals(one), device, repeats)
            svdb = _timed(lambda: torch.linalg.svdvals(a), device, repeats) / BATCH
            label = str(dtype).replace("torch.", "")
            rows.append((f"{n}x{m} {label}", f"eigvalsh(Gram) {eig1 * 1e3:.1f} ms, batched {eigb * 1e3:.1f} ms/matrix; "
                                             f"svdvals {svd1 * 1e3:.1f} ms, batched {svdb * 1e3:.1f} ms/matrix"))
    return rows


def stack_rows(device, stacks, layers: int):
    from ww_monitor.analysis.analyze import AnalysisConfig
    from ww_monitor.analysis.layers import LayerMatrix
    from ww_monitor.monitoring.analysis_job import analyze_on_device

    rows = []
    config = AnalysisConfig(keep_eigenvalues=False)
    for label, width, ffn, depth in stacks:
        use = min(layers, depth)
        mats = []
        for i in range(use):
            for name, shape in (("q", (width, width)), ("k", (width, width)), ("v", (width, width)),
                                ("o", (width, width)), ("gate", (ffn, width)), ("up", (ffn, width)),
                                ("down", (width, ffn))):
                w = (torch.randn(*shape, device=device) / width ** 0.5).to(torch.bfloat16)
                mats.append(LayerMatrix(f"layers.{i}.{name}", "linear", w))
        seconds = _timed(lambda: analyze_on_device(mats, config, device), device, 1)
        per_snapshot = seconds * depth / use
        rows.append((f"{label} stack ({7 * depth} matrices)",
                     f"{seconds:.2f} s for {use} layer(s) -> {per_snapshot:.1f} s per snapshot (x depth)"))
    return rows


def overhead_rows(device, steps: int, width: int, every: int):
    import pytorch_lightning as pl

    import ww_monitor as wwm

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                     nn.Linear(width, 10))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    x = torch.randn(steps * 32, width)
    y = torch.randint(0, 10, (steps * 32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    accel = "gpu" if device.type == "cuda" else "cpu"

    def run(callbacks) -> float:
        torch.manual_seed(0)
        trainer = pl.Trainer(max_epochs=1, accelerator=accel, devices=1, callbacks=callbacks, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        t0 = time.perf_counter()
        trainer.fit(Net(), loader)
        return (time.perf_counter() - t0) / steps

    base = run([])
    cb = wwm.WeightWatcherCallback(every_n_epochs=None, every_n_train_steps=every, figures_every_n_snapshots=None,
                                   log_histograms=False, min_evals=2)
    watched = run([cb])
    return [(f"training loop, {width}-wide MLP, snapshot every {every} steps",
             f"{base * 1e3:.2f} ms/step without, {watched * 1e3:.2f} ms/step with the callback "
             f"({watched / base - 1:+.0%}; {cb.stats['snapshots_taken']} snapshots)")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="reduced shapes on the CPU (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None, help="layers of each stack actually analysed")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device; run with --cpu for the reduced CPU mode")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(1)  # multi-threaded LAPACK on tiny shapes is all barrier waits
    repeats = args.repeats or (2 if args.cpu else 5)
    rows = solver_rows(device, CPU_SHAPES if args.cpu else GPU_SHAPES, repeats)
    rows += stack_rows(device, CPU_STACKS if args.cpu else STACKS, args.layers or (1 if args.cpu else 2))
    rows += overhead_rows(device, args.steps or (6 if args.cpu else 300), 32 if args.cpu else 2048,
                          3 if args.cpu else 50)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"| bench_gpu on {name} (torch {torch.__version__}) | median |")
    print("|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")


if __name__ == "__main__":
    main()
