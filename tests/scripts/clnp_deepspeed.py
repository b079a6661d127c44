"""Task 1 of a CLNP sequence under a DeepSpeed strategy (2 processes), continuing from task 0's file.

    python tests/scripts/clnp_deepspeed.py TASK_DIR deepspeed_cpu_stage_3

Writes TASK_DIR/task1.pt (the CLNP callback's checkpoint_dir file, weights gathered to full tensors);
a failure is written to TASK_DIR/error<rank>.txt.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_exit import exit_now, write_error  # noqa: E402  (the scripts folder is on sys.path)


def main() -> int:
    task_dir, strategy = Path(sys.argv[1]), sys.argv[2]
    logging.getLogger("lightning").setLevel(logging.WARNING)
    import lightning.pytorch as pl

    import lightning_ext.strategies  # noqa: F401  (registers deepspeed_cpu*)
    from lightning_ext.callbacks import CLNP
    from lightning_ext.data import SplitDigitsDataModule
    from lightning_ext.nn.clnp import CLNPLinear
    from test_clnp import DecayedMLP

    # these layers are small: force the in-place fast path (ZeRO-1/2; ZeRO-3 partitions take the W_eff path)
    CLNPLinear.fast_path_min_numel = 0

    try:
        pl.seed_everything(1, verbose=False)
        clnp = CLNP(l1=1e-3, checkpoint_dir=str(task_dir))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=3, logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                             num_sanity_val_steps=0, limit_val_batches=0, callbacks=[clnp])
        trainer.fit(DecayedMLP(hidden=[32, 32], num_tasks=2), datamodule=SplitDigitsDataModule(task=1, batch_size=8))
    except Exception as err:  # noqa: BLE001 - the test reads it
        return write_error(task_dir, err)
    return 0


if __name__ == "__main__":
    exit_now(main())
