"""A 6-block LLaMA (44 weight matrices) learns to copy a sequence, with ``WeightWatcherCallback``.

Runs on CPU in 2-3 minutes on a busy 2-core machine (no download: the model is built from a
``LlamaConfig``)::

    python examples/transformer_copy_task.py                 # logs to ww_logs/
    python examples/transformer_copy_task.py --every-snapshot --report   # 11 snapshots + report.html
    ww-monitor report ww_logs/copy_task/version_0 --out report.html
    tensorboard --logdir ww_logs/

The task: ``[BOS, x_1 .. x_L, SEP, x_1 .. x_L]`` with random tokens ``x_i``; the loss is on the
second half only, so the model must learn to attend back and copy. It is solved (token accuracy
on held-out sequences ~1.0) within a few epochs. The LLaMA sits in the LightningModule as
``self.model``, so its layer names start with ``model.model.`` (``model.model.layers.3.mlp.up_proj``),
the way a user's names look; the figures, the report and the alerts show them without that
common wrapper prefix.

Prints the warnings of the run, the number of alert warnings, the alerts by rule, the validation
accuracy and where the logs (and, with ``--report``, the HTML report) are. ``train_copy_task``
is the run itself, reused by ``benchmarks/bench_transformer_alerts.py``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
import warnings
from collections import Counter

import torch
from torch.utils.data import DataLoader, TensorDataset

#: Token ids: 0 padding (unused), 1 BOS, 2 SEP; the copied tokens are drawn from 3..VOCAB-1.
BOS, SEP, FIRST_TOKEN = 1, 2, 3


def copy_data(n: int, length: int, vocab: int, seed: int) -> TensorDataset:
    """``n`` sequences ``[BOS, x, SEP, x]`` (``x``: ``length`` random tokens)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(FIRST_TOKEN, vocab, (n, length), generator=g)
    bos = torch.full((n, 1), BOS)
    sep = torch.full((n, 1), SEP)
    return TensorDataset(torch.cat([bos, x, sep, x], dim=1))


def make_model(pl, config, lr: float):
    from transformers import LlamaForCausalLM

    class CopyTask(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = LlamaForCausalLM(config)  # names: model.model.layers.N..., model.lm_head
            self.lr = lr

        def _loss_acc(self, ids):
            logits = self.model(input_ids=ids).logits
            half = (ids.shape[1] - 1) // 2  # predict the tokens after SEP
            pred = logits[:, -half - 1:-1]
            target = ids[:, -half:]
            loss = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1))
            return loss, (pred.argmax(-1) == target).float().mean()

        def training_step(self, batch, batch_idx):
            loss, _acc = self._loss_acc(batch[0])
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            loss, acc = self._loss_acc(batch[0])
            self.log("val/loss", loss)
            self.log("val/acc", acc)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)

    return CopyTask()


def _ValLosses(pl):
    class ValLosses(pl.Callback):
        """``(step, validation loss)`` after every validation epoch."""

        def __init__(self):
            self.values: list[tuple[int, float]] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
                self.values.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))

    return ValLosses()


def train_copy_task(logdir: str | None, *, epochs: int = 10, seed: int = 0, samples: int = 2048, length: int = 8,
                    layers: int = 6, batch_size: int = 64, every_n_epochs: int = 1, lr: float = 3e-3,
                    **callback_kwargs) -> dict:
    """Train the copy task once with a ``WeightWatcherCallback(**callback_kwargs)``; log to a
    TensorBoard folder under ``logdir`` (None: no logger). Returns ``{"callback", "log_dir",
    "val_acc", "val_losses", "warnings", "seconds"}`` (``warnings``: every warning raised in ``fit``)."""
    pl = importlib.import_module("pytorch_lightning")
    from transformers import LlamaConfig

    from ww_monitor import WeightWatcherCallback

    pl.seed_everything(seed, verbose=False)
    vocab = 256
    config = LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2 * length + 2,
                         bos_token_id=BOS, eos_token_id=SEP, pad_token_id=0)
    model = make_model(pl, config, lr=lr)
    train = DataLoader(copy_data(samples, length, vocab, seed), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    val = DataLoader(copy_data(512, length, vocab, seed + 10_000), batch_size=256)
    ww = WeightWatcherCallback(every_n_epochs=every_n_epochs, **callback_kwargs)
    val_losses = _ValLosses(pl)
    logger = pl.loggers.TensorBoardLogger(logdir, name="copy_task") if logdir is not None else False
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=logger, callbacks=[ww, val_losses],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         log_every_n_steps=10, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning fit raises, to show and count below
        trainer.fit(model, train, val)
    acc = trainer.callback_metrics.get("val/acc")
    return {"callback": ww, "log_dir": logger.log_dir if logger else None, "val_losses": val_losses.values,
            "val_acc": float(acc) if acc is not None else float("nan"), "warnings": list(caught),
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logdir", default="ww_logs/", help="TensorBoard log folder (default: ww_logs/)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=2048, help="training sequences per epoch")
    p.add_argument("--length", type=int, default=8, help="tokens to copy")
    p.add_argument("--layers", type=int, default=6, help="transformer blocks (6: 44 weight matrices)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads for training (default: half the cores; the analysis uses another)")
    p.add_argument("--every-snapshot", action="store_true",
                   help="max_overhead=None: take every scheduled snapshot (the default cost budget may defer some)")
    p.add_argument("--report", action="store_true", help="also write report.html into the run's folder")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    # figures_min_run_seconds=0: a one-minute run is shorter than the default 60 s after which
    # figures are drawn; figures_timeout: wait for the final figures even on a busy machine.
    extra = {"max_overhead": None} if args.every_snapshot else {}
    out = train_copy_task(args.logdir, epochs=args.epochs, seed=args.seed, samples=args.samples, length=args.length,
                          layers=args.layers, figures_min_run_seconds=0, figures_timeout=300, **extra)
    ww = out["callback"]
    for w in out["warnings"]:  # what the console would have shown
        print(f"{w.category.__name__}: {w.message}")
    alert_warnings = [w for w in out["warnings"] if w.category.__name__ == "WWMonitorAlert"]
    by_rule = Counter(a.rule for a in ww.alerts_fired)
    matrices = len(ww.history[-1].layers) if len(ww.history) else 0
    print(f"\n{matrices} weight matrices, {len(ww.history)} snapshots in {out['seconds']:.1f} s of training "
          f"({ww.stats['snapshots_skipped']} skipped, {ww.stats['snapshots_deferred']} deferred by the cost budget); "
          f"validation token accuracy {out['val_acc']:.3f}")
    print(f"{len(alert_warnings)} alert warning(s); {len(ww.alerts_fired)} layer alert(s) fired: "
          + (", ".join(f"{r} {n}" for r, n in by_rule.items()) or "none"))
    print(f"logs: {os.path.abspath(out['log_dir'])}")
    if args.report:
        from ww_monitor.outputs.offline_report import write_report

        report = write_report(out["log_dir"], os.path.join(out["log_dir"], "report.html"))
        print(f"report: {os.path.abspath(report)}")
        out["report"] = str(report)
    return out


if __name__ == "__main__":
    main()
