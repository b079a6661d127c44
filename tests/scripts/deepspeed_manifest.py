"""Train 3 steps under DeepSpeed ZeRO-2 on CPU with a technique, save a (directory) checkpoint.

    python tests/scripts/deepspeed_manifest.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(out: Path) -> None:
    import lightning.pytorch as pl

    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier
    from lightning_ext.strategies import DeepSpeedCPUStrategy
    from toy_techniques import Gate

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedCPUStrategy(stage=2), max_steps=3,
                         logger=False, enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(out),
                         callbacks=[Gate(target_modules=["net.0"], init=0.5)])
    trainer.fit(MLPClassifier(hidden=[16]), datamodule=DigitsDataModule())
    trainer.save_checkpoint(out / "ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
