"""``wwm.analyze`` vs weightwatcher 0.7.7 vs bare ``torch.linalg.svdvals``, in one process.

Models (random init, PyTorch defaults; no torchvision / transformers needed):

* ``bert``: a BERT-base-sized stack, 12 x [query, key, value, attention.output.dense (768x768),
  intermediate.dense (3072x768), output.dense (768x3072)] = 72 matrices. Embeddings are left
  out unless ``--embeddings`` (word 30522x768 and position 512x768; token_type 2x768 is below
  min_evals and skipped by both tools).
* ``resnet18`` / ``resnet34``: torchvision's conv stack (7x7 stem, BasicBlocks of 3x3 convs with
  64..512 channels, 1x1 downsamples) and the 512x1000 fc. Conv layers are pooled: k*k slices of
  out x in per layer, 9 x 512 = 4608 eigenvalues for the largest.

Timed, interleaved (every repeat runs every tool, in a rotating order) and reported as medians
of wall-clock and of CPU time (``time.process_time``; with one thread it is the compute itself
and does not count time the VM steals, so it is the stable number on a noisy machine):

* ``ww_monitor``: ``wwm.analyze(model)``, defaults.
* ``weightwatcher``: ``WeightWatcher(model).analyze()``, defaults, warm (the first call in the
  process is a discarded warm-up).
* ``svdvals``: ``torch.linalg.svdvals`` alone on float64 copies (made before timing) of exactly
  the matrices weightwatcher decomposes: one call per layer, conv layers as one batched call on
  their k*k slices. The floor for any tool that takes a full SVD.

Cold start (``import`` of the tool + its first ``analyze``) is measured in fresh subprocesses
(the model is built before the clock starts; torch import is not counted).

Threads: LAPACK/BLAS thread pools are set to ``--threads`` (default 1) for torch, MKL,
OpenBLAS and OpenMP *before* numpy/torch are imported, the same for all tools and subprocesses.
On oversubscribed or steal-heavy VMs, multi-threaded LAPACK (MKL and OpenBLAS alike) can be
10-40x slower than single-threaded because every panel step waits on a barrier;
``--threads 0`` keeps the libraries' defaults to see that.

Run::

    python benchmarks/bench_analyze.py              # bert + resnet18 + resnet34, 5 repeats, cold starts
    python benchmarks/bench_analyze.py --quick      # 4 BERT layers + resnet18, 2 repeats, 1 cold run
    python benchmarks/bench_analyze.py --models resnet18 --repeats 3 --threads 2
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import DEFAULT_THREADS, pin_threads

if __name__ == "__main__":
    pin_threads(sys.argv[1:])

import argparse
import contextlib
import io
import json
import logging
import statistics
import subprocess
import time
import warnings

import torch
from torch import nn

BERT_LAYERS = 12
QUICK_BERT_LAYERS = 4
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
SEED = 0


# ----------------------------------------------------------------------------- models
class _Named(nn.Module):
    """A container whose children are given by keyword, for BERT-like module paths."""

    def __init__(self, children: dict[str, nn.Module]):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def bert_base(num_layers: int = BERT_LAYERS, embeddings: bool = False, d: int = 768, ffn: int = 3072) -> nn.Module:
    def layer():
        return _Named({
            "attention": _Named({
                "self": _Named({"query": nn.Linear(d, d), "key": nn.Linear(d, d), "value": nn.Linear(d, d)}),
                "output": _Named({"dense": nn.Linear(d, d)}),
            }),
            "intermediate": _Named({"dense": nn.Linear(d, ffn)}),
            "output": _Named({"dense": nn.Linear(ffn, d)}),
        })

    parts = {"encoder": _Named({"layer": nn.ModuleList(layer() for _ in range(num_layers))})}
    if embeddings:
        parts = {
            "embeddings": _Named({
                "word_embeddings": nn.Embedding(30522, d),
                "position_embeddings": nn.Embedding(512, d),
                "token_type_embeddings": nn.Embedding(2, d),
            }),
            **parts,
        }
    return _Named(parts)


def resnet(name: str = "resnet18") -> nn.Module:
    blocks = RESNET_BLOCKS[name]
    stages = []
    c_in = 64
    for stage, (c_out, n_blocks) in enumerate(zip((64, 128, 256, 512), blocks)):
        layer = []
        for b in range(n_blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            parts = {"conv1": nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                     "conv2": nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)}
            if stride != 1 or c_in != c_out:
                parts["downsample"] = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
            layer.append(_Named(parts))
            c_in = c_out
        stages.append(nn.Sequential(*layer))
    return _Named({"conv1": nn.Conv2d(3, 64, 7, 2, 3, bias=False), "layer1": stages[0], "layer2": stages[1],
                   "layer3": stages[2], "layer4": stages[3], "fc": nn.Linear(512, 1000)})


def build(model_name: str, quick: bool, embeddings: bool) -> nn.Module:
    torch.manual_seed(SEED)
    if model_name == "bert":
        return bert_base(QUICK_BERT_LAYERS if quick else BERT_LAYERS, embeddings)
    return resnet(model_name)


def describe(model_name: str, quick: bool, embeddings: bool) -> str:
    if model_name == "bert":
        n = QUICK_BERT_LAYERS if quick else BERT_LAYERS
        return f"BERT-base stack, {n} layers" + (" + embeddings" if embeddings else "")
    return {"resnet18": "ResNet-18 convs + fc", "resnet34": "ResNet-34 convs + fc"}[model_name]


# ----------------------------------------------------------------------------- tools
def svd_matrices(model: nn.Module) -> list[torch.Tensor]:
    """float64 copies of the matrices weightwatcher decomposes (conv: k*k slices of out x in)."""
    mats = []
    for module in model.modules():
        if (isinstance(module, nn.Embedding) and module.embedding_dim >= 8 and module.num_embeddings >= 8) or isinstance(module, nn.Linear):
            mats.append(module.weight.detach().double())
        elif isinstance(module, nn.Conv2d):
            w = module.weight.detach()
            mats.append(w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1).double().contiguous())
    return mats


def _quiet_weightwatcher():
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # it prints banners and fit notes
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def make_tools(model: nn.Module) -> dict:
    import weightwatcher

    import ww_monitor as wwm

    with _quiet_weightwatcher():
        watcher = weightwatcher.WeightWatcher(model=model)
    mats = svd_matrices(model)

    def run_ww():
        with _quiet_weightwatcher():
            return len(watcher.analyze())

    def run_ours():
        return len(wwm.analyze(model).layers)

    def run_svd():
        for m in mats:
            torch.linalg.svdvals(m)
        return len(mats)

    return {"ww_monitor": run_ours, "weightwatcher": run_ww, "svdvals": run_svd}


def time_warm(model: nn.Module, repeats: int) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """Median (wall, CPU) seconds per tool; interleaved repeats, rotating who goes first."""
    tools = make_tools(model)
    counts = {name: fn() for name, fn in tools.items()}  # warm-up; weightwatcher's 1st call
    names = list(tools)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            tools[name]()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}, counts


# ----------------------------------------------------------------------------- cold start
_COLD_CHILD = """
import json, sys, time
sys.path.insert(0, {bench_dir!r})
import bench_analyze as b
model = b.build({model!r}, {quick!r}, {embeddings!r})
t0, c0 = time.perf_counter(), time.process_time()
if {tool!r} == "ww_monitor":
    import ww_monitor as wwm
    wwm.analyze(model)
else:
    with b._quiet_weightwatcher():
        import weightwatcher
        weightwatcher.WeightWatcher(model=model).analyze()
print(json.dumps([time.perf_counter() - t0, time.process_time() - c0]))
"""


def time_cold(model_name: str, tool: str, quick: bool, embeddings: bool, runs: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds of import + first analyze in fresh interpreters."""
    code = _COLD_CHILD.format(bench_dir=os.path.dirname(os.path.abspath(__file__)), model=model_name,
                              quick=quick, embeddings=embeddings, tool=tool)
    wall, cpu = [], []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, env=os.environ)
        w, c = json.loads(out.stdout.strip().splitlines()[-1])
        wall.append(w)
        cpu.append(c)
    return statistics.median(wall), statistics.median(cpu)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_BERT_LAYERS} BERT layers + resnet18, 2 repeats, 1 cold run")
    ap.add_argument("--models", default=None, help="comma list of bert,resnet18,resnet34")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cold-runs", type=int, default=None, help="cold-start subprocesses per tool (0: skip)")
    ap.add_argument("--embeddings", action="store_true", help="add BERT's embeddings (30522x768, 512x768)")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                    help="BLAS/LAPACK/torch threads for every tool (0: library defaults)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    models = args.models.split(",") if args.models else (["bert", "resnet18"] if args.quick else ["bert", "resnet18", "resnet34"])
    repeats = args.repeats or (2 if args.quick else 5)
    cold_runs = args.cold_runs if args.cold_runs is not None else (1 if args.quick else 3)

    import weightwatcher

    import ww_monitor

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), weightwatcher {weightwatcher.__version__}, "
          f"ww_monitor {ww_monitor.__version__}; threads setting {args.threads or 'library defaults'}; "
          f"{repeats} interleaved warm repeats (medians), {cold_runs} cold run(s)\n", flush=True)
    rows = []
    nan = (float("nan"), float("nan"))
    for name in models:
        model = build(name, args.quick, args.embeddings)
        warm, counts = time_warm(model, repeats)
        if counts["ww_monitor"] != counts["weightwatcher"]:
            print(f"note: {name}: ww_monitor analysed {counts['ww_monitor']} layers, "
                  f"weightwatcher {counts['weightwatcher']}")
        cold = {t: time_cold(name, t, args.quick, args.embeddings, cold_runs) if cold_runs else nan
                for t in ("ww_monitor", "weightwatcher")}
        rows.append((describe(name, args.quick, args.embeddings), counts["ww_monitor"], warm, cold))
        print(f"{name} (wall / CPU s): ours {warm['ww_monitor'][0]:.2f} / {warm['ww_monitor'][1]:.2f}, "
              f"weightwatcher {warm['weightwatcher'][0]:.2f} / {warm['weightwatcher'][1]:.2f}, "
              f"svdvals {warm['svdvals'][0]:.2f} / {warm['svdvals'][1]:.2f}; cold ours "
              f"{cold['ww_monitor'][0]:.2f} / {cold['ww_monitor'][1]:.2f}, weightwatcher "
              f"{cold['weightwatcher'][0]:.2f} / {cold['weightwatcher'][1]:.2f}", flush=True)

    for k, what in ((0, "wall-clock"), (1, "CPU (process_time)")):
        print(f"\n{what} seconds, medians:\n")
        print("| model | ESDs | ww_monitor | weightwatcher (warm) | svdvals only "
              "| weightwatcher / ww_monitor | ww_monitor / svdvals | cold start ww_monitor | cold start weightwatcher |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, n, warm, cold in rows:
            ours, theirs, svd = warm["ww_monitor"][k], warm["weightwatcher"][k], warm["svdvals"][k]
            print(f"| {label} | {n} | {ours:.2f} | {theirs:.2f} | {svd:.2f} | {theirs / ours:.1f}x "
                  f"| {ours / svd:.2f}x | {cold['ww_monitor'][k]:.2f} | {cold['weightwatcher'][k]:.2f} |")


if __name__ == "__main__":
    main()
