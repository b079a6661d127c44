"""The quick start in Python: the same run as ``lightning fit --config configs/quickstart.yaml``.

    python examples/quickstart.py [--max-steps 300] [--strategy deepspeed_cpu_stage_2 --devices 2]

Techniques are added as callbacks to the Trainer you already have, e.g.
``Trainer(callbacks=[lightning_ext.callbacks.<Technique>(...)])``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

import lightning_ext.strategies  # noqa: F401  (registers the deepspeed_cpu* strategies)
from lightning_ext.data import StdlibCharDataModule
from lightning_ext.models import CharLlama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    pl.seed_everything(0)
    data = StdlibCharDataModule(seq_len=128, batch_size=32)
    model = CharLlama(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_seq_len=128,
                      lr=3e-3, warmup_steps=30)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices, strategy=args.strategy, max_steps=args.max_steps,
                         val_check_interval=50, limit_val_batches=8, log_every_n_steps=10,
                         logger=CSVLogger("lightning_logs", name="quickstart_py"),
                         callbacks=[ModelCheckpoint(monitor="val/bpc", save_last=True)])
    trainer.fit(model, datamodule=data)
    print(f"validation bits per character: {trainer.callback_metrics['val/bpc'].item():.3f}")


if __name__ == "__main__":
    main()
