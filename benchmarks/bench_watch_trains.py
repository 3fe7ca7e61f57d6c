"""What a LoRA fine-tune's snapshots cost before and after the training defaults that watch what trains.

    python benchmarks/bench_watch_trains.py                      # LLaMA from a config, LoRA on q/v, 3 repeats
    python benchmarks/bench_watch_trains.py --target all --repeats 5
    python benchmarks/bench_watch_trains.py --quick              # a smaller model, 1 repeat (smoke test)

A ``transformers`` ``LlamaConfig`` model (random init, no download; ``--layers`` blocks of 7
weight matrices plus the embedding and the head) wrapped with peft LoRA adapters (``--target
qv``: q_proj and v_proj; ``all``: every linear of the blocks) is trained for ``--steps`` AdamW
steps on random tokens with ``ww_monitor.Monitor`` taking a snapshot every ``--every`` steps, in
two configurations:

* **before**: ``peft=False, watch_frozen=True`` (what the monitor did before these defaults: the
  frozen base weights copied and analysed at every snapshot, the adapters never);
* **after**: the defaults (``peft="auto"``, ``watch_frozen=False``: the base weights analysed at
  the baseline only, the adapter updates at every snapshot).

``blocking=True`` so each snapshot's analysis is timed alone (its wall time, one BLAS thread);
per snapshot the bytes copied, the matrices analysed, the time on the training thread to select
and copy them (``stats["copy_seconds"]``: the layer walk, the LoRA r x r cores, the copies) and
the analysis time (``history[i].seconds``); per run the lines of the history that are adapter
updates and the wall time of the whole loop. The configurations run interleaved (before/after, then after/before,
...), each repeat on a fresh model with the same seed; the table shows medians over repeats of
the baseline snapshot and of the later snapshots (median over them first).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _threads import DEFAULT_THREADS, pin_threads

if __name__ == "__main__":
    pin_threads(sys.argv[1:])

import argparse
import statistics
import time
import warnings

import torch

CONFIGS = {
    "before (peft=False, watch_frozen=True)": {"peft": False, "watch_frozen": True},
    "after (defaults: peft='auto', watch_frozen=False)": {},
}
TARGETS = {"qv": ["q_proj", "v_proj"], "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]}


def build(args):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=args.seq)
    lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS[args.target],
                           lora_dropout=0.0)
    return peft.get_peft_model(LlamaForCausalLM(config), lora)


def one_run(args, options: dict) -> dict:
    """Train once with a monitor; per snapshot: bytes, matrices, copy and analysis seconds."""
    import ww_monitor

    model = build(args)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    monitor = ww_monitor.Monitor(None, every_n_steps=args.every, blocking=True, figures_every_n_snapshots=None,
                                 **options)
    g = torch.Generator().manual_seed(0)
    snaps = []
    t_start = time.perf_counter()
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        before = (monitor.stats["snapshots_taken"], monitor.stats["copy_seconds"])
        monitor.step(model, step)
        if monitor.stats["snapshots_taken"] > before[0]:
            snaps.append({"bytes": monitor.stats["snapshot_bytes"], "copied": monitor.stats["matrices_copied"],
                          "copy_s": monitor.stats["copy_seconds"] - before[1]})
    monitor.close()
    wall = time.perf_counter() - t_start
    for snap, record in zip(snaps, monitor.history):
        snap["analysis_s"] = record.seconds
        snap["analysed"] = len(record.layers)
    lora_rows = sum("lora_BA" in name for r in monitor.history for name in r.layers)
    return {"snaps": snaps, "wall": wall, "lora_rows": lora_rows, "frozen": monitor.stats["frozen_layers"],
            "matrices": len(monitor.history[0].layers) + len(monitor.history[0].skipped)}


def _median_over(runs: list[dict], key: str, later: bool) -> float:
    per_run = []
    for run in runs:
        snaps = run["snaps"][1:] if later else run["snaps"][:1]
        per_run.append(statistics.median(s[key] for s in snaps))
    return statistics.median(per_run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (7 weight matrices each)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--target", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--quick", action="store_true", help="2 blocks of width 128, 8 steps, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.vocab, args.steps, args.repeats = 2, 128, 512, 8, 1
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*(no logger|not analysed).*")  # this script's output only
    one_run(args, {})  # warm-up: imports, allocator, the cost model
    runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    names = list(CONFIGS)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # interleaved, alternating order
            runs[name].append(one_run(args, CONFIGS[name]))
    first = runs[names[1]][0]
    print(f"LLaMA from a config: {args.layers} blocks, hidden {args.hidden}, vocab {args.vocab}; {first['matrices']} "
          f"weight matrices; LoRA r={args.rank} on {args.target} ({first['frozen']} frozen matrices); "
          f"{args.steps} steps, a snapshot every {args.every}; {args.repeats} repeats, medians; "
          f"{args.threads} thread(s)")
    head = ("configuration", "analysed", "MB copied", "select+copy ms", "analysis s", "lora rows", "run s")
    print(f"{head[0]:<52}" + "".join(f"{h:>20}" for h in head[1:]))
    print(f"{'':<52}" + "".join(f"{'baseline / later':>20}" for _ in head[1:5]) + f"{'all':>20}{'all':>20}")
    for name, rs in runs.items():
        cells = []
        for key, scale, fmt in (("analysed", 1, "{:.0f}"), ("bytes", 1e-6, "{:.2f}"), ("copy_s", 1e3, "{:.1f}"),
                                ("analysis_s", 1, "{:.3f}")):
            base, later = (_median_over(rs, key, later) * scale for later in (False, True))
            cells.append(f"{fmt.format(base)} / {fmt.format(later)}")
        cells.append(f"{statistics.median(r['lora_rows'] for r in rs):.0f}")
        cells.append(f"{statistics.median(r['wall'] for r in rs):.2f}")
        print(f"{name:<52}" + "".join(f"{c:>20}" for c in cells))
    b, a = (runs[n] for n in names)
    for key, label in (("bytes", "bytes copied"), ("analysis_s", "analysis time")):
        ratio = _median_over(a, key, True) / _median_over(b, key, True)
        print(f"later snapshots, {label}: after / before = {ratio:.4f}")


if __name__ == "__main__":
    main()
