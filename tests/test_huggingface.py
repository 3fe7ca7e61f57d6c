"""``ww_monitor.huggingface.WeightWatcherCallback`` with a real ``transformers.Trainer`` on CPU
(a tiny BERT built from a config, random init, synthetic data: no downloads)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ww_monitor.huggingface import STATE_FILE, WeightWatcherCallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(not analysed|figures|no logger).*:RuntimeWarning")

STEPS, EVERY = 6, 3


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=8, vocab=64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=96, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def trainer_for(tmp_path, callback, max_steps=STEPS, save_steps=EVERY):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        save_steps=save_steps, logging_steps=1000, report_to="tensorboard", use_cpu=True, disable_tqdm=True,
        save_only_model=False, seed=0)
    return transformers.Trainer(model=tiny_bert(), args=args, train_dataset=Synthetic(), callbacks=[callback])


def callback(**kwargs):
    return WeightWatcherCallback(every_n_steps=EVERY, every_n_epochs=None, blocking=True,
                                 figures_every_n_snapshots=None, summary_include_unreliable=True, **kwargs)


def test_trainer_logs_every_layer_and_resumes_without_gaps(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    ww = callback()
    trainer_for(tmp_path, ww).train()
    assert ww.history.steps == [0, 3, 6]
    layers = sorted(set(ww.history.to_pandas().name))
    assert len(layers) >= 6  # q, k, v, attention output, intermediate, output dense ...


    acc = read_run(tmp_path / "tb")
    for layer in layers:
        assert [e.step for e in acc.Scalars(f"ww/alpha/{layer}")] == [0, 3, 6], layer
        assert [e.step for e in acc.Histograms(f"ww/esd/{layer}")] == [0, 3, 6], layer
    # The Trainer's own TensorBoard integration wrote to the same run, and our tags only once.
    tags = acc.Tags()["scalars"]
    assert "train/train_loss" in tags and not any(t.startswith("train/ww/") for t in tags)

    checkpoint = tmp_path / "out" / "checkpoint-3"
    assert (checkpoint / STATE_FILE).exists()
    resumed = callback(tensorboard=False, report_to_integrations=False)
    with pytest.warns(RuntimeWarning, match=r"^huggingface\.WeightWatcherCallback: no logger"):  # nowhere to write
        trainer_for(tmp_path, resumed).train(resume_from_checkpoint=str(checkpoint))
    assert resumed.history.steps == [0, 3, 6]  # 0 and 3 from the checkpoint, 6 taken after resuming
    assert not any(t.startswith("train/ww/") for t in read_run(tmp_path / "tb").Tags()["scalars"])  # opted out
    before = ww.history.to_pandas().query("step <= 3").alpha.tolist()
    assert resumed.history.to_pandas().query("step <= 3").alpha.tolist() == pytest.approx(before)


def read_run(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_report_to_integrations_receive_the_scalars(tmp_path):
    # Our own TensorBoard writer off: the Trainer's TensorBoard integration gets the ww/ scalars
    # (under its "train/" prefix), each snapshot once, when its analysis completes.
    ww = callback(tensorboard=False)
    trainer = trainer_for(tmp_path, ww)
    trainer.train()
    callbacks = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert callbacks.index("WeightWatcherCallback") == callbacks.index("TensorBoardCallback") - 1
    (run,) = (tmp_path / "out" / "runs").iterdir()  # the integration's run folder
    acc = read_run(run)
    assert [e.value for e in acc.Scalars("train/ww/snapshot_step")] == [0, 3, 6]
    for layer in sorted(set(ww.history.to_pandas().name)):
        assert [e.step for e in acc.Scalars(f"train/ww/alpha/{layer}")] == [0, 3, 6], layer
    assert [e.value for e in acc.Scalars("train/ww/summary/alpha")] == pytest.approx(
        [r.summary["alpha"] for r in ww.history])


def test_alpha_drift_stops_the_trainer(tmp_path):
    # Random-init alpha is far below 100: the floor stops at the first snapshot (warm-up off).
    ww = callback(tensorboard=False, alpha_drift={"floor": 100.0, "warmup": False, "min_snapshots": 1})
    trainer = trainer_for(tmp_path, ww, max_steps=30, save_steps=1000)
    with pytest.warns(UserWarning, match="AlphaDriftEarlyStopping: stopping training"):
        trainer.train()
    assert trainer.state.global_step < 30
    assert ww.drift.stopped_step == 0


def test_huggingface_example(tmp_path):
    import runpy
    from pathlib import Path

    example = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "huggingface_trainer.py"))
    ww = example["main"](["--out", str(tmp_path / "out"), "--steps", "4", "--every", "2", "--on-lag", "wait"])
    assert ww.history.steps == [0, 2, 4]
    assert list((tmp_path / "out" / "runs" / "ww_monitor").glob("events.out.tfevents*"))
