"""Spectral monitoring of a Hugging Face ``Trainer``: ``ww_monitor.huggingface.WeightWatcherCallback``.

    pip install "ww-monitor[huggingface]"
    python examples/huggingface_trainer.py --out hf_out --steps 60
    tensorboard --logdir hf_out/runs

A small BERT built from a config (random init, nothing downloaded) learns a synthetic task
(is token 1 in the sequence?). The callback takes a snapshot every ``--every`` steps, writes
``ww/alpha/<layer>``, ``ww/esd/<layer>`` ... to TensorBoard next to the Trainer's own logs, and
saves its state in every checkpoint, so ``--resume`` continues the spectral history without gaps.

``--balance tempbalance`` (or ``alphadecay``) adds ``ww_monitor.huggingface.TempBalance``
(``AlphaDecay``) after the monitor: per-layer learning rates (weight decays) from the monitor's
alphas every ``--every`` steps, logged through the Trainer's TensorBoard integration as
``train/ww/balance/<layer>`` (``train/ww/balance_wd/<layer>``) and saved in every checkpoint.
"""

from __future__ import annotations

import argparse

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from ww_monitor.huggingface import AlphaDecay, TempBalance, WeightWatcherCallback

VOCAB, SEQ = 128, 16
BALANCERS = {"tempbalance": TempBalance, "alphadecay": AlphaDecay}


class Synthetic(torch.utils.data.Dataset):
    """Random token sequences labelled by whether token 1 occurs (a learnable, download-free task)."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)
        self.ids[torch.rand(n, generator=g) < 0.5, 0] = 1
        self.ids = self.ids[:, torch.randperm(SEQ, generator=g)]
        self.labels = (self.ids == 1).any(dim=1).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(argv=None) -> WeightWatcherCallback:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="hf_out")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=20, help="snapshot every this many steps")
    p.add_argument("--on-lag", default="skip", choices=["skip", "wait"],
                   help="when the analysis is behind: skip the snapshot (never blocks training) or wait for it")
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in --out")
    p.add_argument("--balance", choices=sorted(BALANCERS), default=None,
                   help="also balance per-layer learning rates (tempbalance) or weight decays (alphadecay)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=SEQ, num_labels=2)
    model = BertForSequenceClassification(config)
    ww = WeightWatcherCallback(every_n_steps=args.every, every_n_epochs=None, on_lag=args.on_lag,
                               tensorboard_dir=f"{args.out}/runs/ww_monitor")
    callbacks = [ww]
    if args.balance:  # after the monitor, so it reuses the monitor's analysis
        callbacks.append(BALANCERS[args.balance](every_n_epochs=None, every_n_train_steps=args.every))
    training_args = TrainingArguments(
        output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=32, learning_rate=5e-4,
        weight_decay=0.01 if args.balance == "alphadecay" else 0.0,
        save_steps=args.every, logging_steps=args.every, report_to="tensorboard", use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=Synthetic(2048), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True if args.resume else None)

    df = ww.history.to_pandas()
    print(f"{len(ww.history)} snapshots at steps {ww.history.steps}")
    print(df[df.step == df.step.max()][["name", "alpha", "stable_rank"]].to_string(index=False))
    if args.balance:
        balancer = callbacks[1]
        last = balancer.history[-1]
        print(f"{type(balancer).__name__}: updates at steps {[r.step for r in balancer.history]}; the latest from "
              f"{last.source} (first and last layer keep 1):")
        for name, alpha, factor in zip(last.layers, last.alphas, last.factors):
            print(f"  {name:<52} alpha {alpha:6.3f}  factor {factor:.3f}")
    print(f"tensorboard --logdir {args.out}/runs")
    return ww


if __name__ == "__main__":
    main()
