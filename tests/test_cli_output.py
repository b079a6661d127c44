"""What a user sees: the step progress bar, no noise from other libraries, the closing line and the picture,
``--help`` that names the suite, TensorBoard logging, optimizer diagnostics from a YAML optimizer, and a
mid-epoch resume without Lightning's "dataloader is not resumable" warning."""

from __future__ import annotations

import csv
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from cli_utils import ROOT, run_cli
from torch.utils.data import DataLoader

from lightning_ext.callbacks import LAWN
from lightning_ext.data import DigitsDataModule
from lightning_ext.models import MLPClassifier
from lightning_ext.plot import _mean_over_layers, plot_run, read_metrics
from lightning_ext.progress import StepProgressBar

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
SHORT = ["--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
         "--trainer.log_every_n_steps", "1", "--model.init_args.hidden_size", "32",
         "--model.init_args.intermediate_size", "64"]


def _run_lightning(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The ``lightning`` console script exactly as pip writes it (``lightning_main()`` reading ``sys.argv``)."""
    code = "import sys; sys.argv[0] = 'lightning'; from lightning_ext.cli import lightning_main; lightning_main()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_the_quick_start_is_quiet_and_ends_with_where_things_are(tmp_path):
    done = _run_lightning(["fit", "--config", str(QUICKSTART), *SHORT], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (done.stdout + done.stderr).replace("\r", "\n")
    noise = [line for line in text.splitlines()
             if any(word in line for word in ("Warning", "warn(", "Tip:", "args parameter", "deprecated"))]
    assert noise == []
    assert "Epoch 0/-2" not in text and "v_num" not in text
    assert "step (epoch 0)" in text  # the bar counts steps
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("lightning-ext: checkpoint: ")
    fields = dict(part.split(": ", 1) for part in last.removeprefix("lightning-ext: ").split(" | "))
    assert set(fields) == {"checkpoint", "logs", "picture"}
    for path in fields.values():
        assert (tmp_path / path).exists(), path
    assert (tmp_path / fields["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_help_names_the_suite(tmp_path):
    for args in (["--help"], ["fit", "--help"]):
        done = run_cli(args, tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        flat = " ".join(done.stdout.split())
        for name in ("lightning_ext.callbacks", "LoRA", "QuEST", "CLNP", "lightning_ext.optimizers", "AdamP",
                     "lightning_ext.optimizers.cli.LAWN", "deepspeed_cpu_stage_1", "lightning-ext plot"):
            assert name in flat, (args, name)


def test_the_step_bar_counts_optimizer_steps_across_epochs(tmp_path):
    class Probe(pl.Callback):
        seen: list = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            bar = trainer.progress_bar_callback
            task = bar.progress.tasks[bar.train_progress_bar_id]
            self.seen.append((trainer.global_step, task.completed, task.total, str(task.description)))

    bar, probe = StepProgressBar(), Probe()
    data = DigitsDataModule(batch_size=512)  # 3 batches per epoch: 5 steps span 2 epochs
    trainer = pl.Trainer(max_steps=5, callbacks=[bar, probe], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(MLPClassifier(hidden=[8]), datamodule=data)
    assert [s[:3] for s in probe.seen] == [(k, k, 5) for k in range(1, 6)]
    assert probe.seen[-1][3].startswith("step (epoch 1)")
    assert "v_num" not in bar.get_metrics(trainer, trainer.lightning_module)


def _tensorboard_tags(folder: Path) -> set[str]:
    """The scalar tags in a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            tags.update(v.tag for v in event.summary.value)
            at += 12 + length + 4
    return tags


def test_tensorboard_logging_records_training_and_technique_diagnostics(tmp_path):
    pytest.importorskip("tensorboardX")
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = pl.Trainer(max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[LAWN(free_steps=2)],
                         enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(MLPClassifier(hidden=[8]), datamodule=DigitsDataModule(batch_size=64))
    logger.experiment.flush()
    tags = _tensorboard_tags(tmp_path / "tb")
    assert {"train/loss", "lawn/constrained", "lawn/radius_mean"} <= tags


@pytest.mark.parametrize("config, keys", [("lawn_optimizer.yaml", {"lawn/constrained"}),
                                          ("cram_optimizer.yaml", {"cram/sparsity"})])
def test_a_yaml_optimizer_wrapper_logs_its_diagnostics(tmp_path, config, keys):
    done = run_cli(["fit", "--config", str(ROOT / "configs" / config), "--trainer.max_steps", "3",
                    "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
                    "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                    "--trainer.logger.init_args.save_dir", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics,) = tmp_path.rglob("metrics.csv")
    with open(metrics) as f:
        assert keys <= set(next(csv.reader(f)))


def test_plot_draws_each_prefix_and_averages_per_layer_series(tmp_path):
    rows = [{"step": s, "train/loss": 2.0 / (s + 1), "val/acc": "" if s % 2 else 0.5 + s / 100,
             "quest/trust_fraction": 0.99, **{f"quest/layer{i}/weight_rel_mse": 0.01 * i for i in range(10)}}
            for s in range(6)]
    (tmp_path / "version_3").mkdir()
    with open(tmp_path / "version_3" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    series = read_metrics(tmp_path / "version_3" / "metrics.csv")
    assert series["val/acc"][0] == [0, 2, 4]  # empty cells left out
    quest = sorted(n for n in series if n.startswith("quest/"))
    lines = _mean_over_layers(quest, series)
    assert set(lines) == {"quest/trust_fraction", "quest/*/weight_rel_mse (mean of 10)"}
    assert lines["quest/*/weight_rel_mse (mean of 10)"][1] == pytest.approx([0.045] * 6)
    out = plot_run(tmp_path)  # the folder above the versions: the newest is drawn
    assert out == tmp_path / "version_3" / "metrics.png" and out.read_bytes()[:4] == b"\x89PNG"


class _PlainLoaderDigits(DigitsDataModule):
    """The control: the same data through a plain DataLoader, which Lightning cannot tell is resumable."""

    def train_dataloader(self):
        loader = super().train_dataloader()
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=True)


@pytest.mark.parametrize("datamodule, warns", [(DigitsDataModule, False), (_PlainLoaderDigits, True)])
def test_a_mid_epoch_resume_does_not_warn_that_the_dataloader_is_not_resumable(tmp_path, datamodule, warns):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(steps, ckpt_path=None):
        torch.manual_seed(0)
        saver = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=3, save_top_k=-1)
        trainer = pl.Trainer(max_steps=steps, callbacks=[saver], logger=False, limit_val_batches=0,
                             enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(MLPClassifier(hidden=[8]), datamodule=datamodule(batch_size=64), ckpt_path=ckpt_path)

    fit(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(5, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert any("not resumable" in str(w.message) for w in caught) == warns


def test_plot_all_versions_joins_a_run_and_its_resumption(tmp_path):
    for version, steps in ((0, range(0, 4)), (1, range(4, 8))):  # the resumed fit logs into version_1
        (tmp_path / f"version_{version}").mkdir()
        with open(tmp_path / f"version_{version}" / "metrics.csv", "w", newline="") as f:
            f.write("step,train/loss\n" + "".join(f"{s},{1.0 / (s + 1)}\n" for s in steps))
    done = run_cli(["plot", str(tmp_path), "--all", "--out", str(tmp_path / "all.png")], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "all.png") and (tmp_path / "all.png").stat().st_size > 0
    missing = run_cli(["plot", str(tmp_path / "nowhere")], tmp_path)
    assert missing.returncode != 0 and "no metrics.csv" in missing.stderr and "Traceback" not in missing.stderr


def test_setup_work_shows_a_bar_only_when_the_trainer_shows_progress():
    from lightning_ext.progress import setup_bar, setup_progress

    quiet = pl.Trainer(enable_progress_bar=False, logger=False)
    shown = pl.Trainer(enable_progress_bar=True, logger=False)
    assert type(setup_bar(quiet, "x")).__name__ == "_NoBar"
    with setup_bar(shown, "x", total=3) as bar:
        bar.update()
        assert bar.n == 1 and bar.total == 3
    assert list(setup_progress(shown, range(5), "y", total=5)) == list(range(5))
