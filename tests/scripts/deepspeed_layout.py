"""Build ShardLayout.from_deepspeed (ZeRO-1/2) / from_deepspeed_zero3 on each rank of a live 2-process DeepSpeed
run (CPU) and check it against DeepSpeed's own fp32 partition: the module's weights cut by the layout equal it.

    python tests/scripts/deepspeed_layout.py OUT STAGE
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(out: Path, stage: int) -> None:
    import lightning.pytorch as pl
    import torch

    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier
    from lightning_ext.optimizers.shard_layout import ShardLayout
    from lightning_ext.strategies import DeepSpeedCPUStrategy

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx:  # once, before the first step (weights = master copy)
                return
            from deepspeed.utils import safe_get_full_fp32_param

            zero = trainer.strategy.deepspeed_engine.optimizer
            report = []
            groups = zero.fp16_groups if stage == 3 else zero.bit16_groups
            for group in range(len(groups)):
                if stage == 3:  # parameters partitioned too: gather them (a collective, every rank takes part)
                    layout = ShardLayout.from_deepspeed_zero3(zero, group)
                    full = [safe_get_full_fp32_param(p).detach().float() for p in groups[group]]
                    local = zero.fp32_partitioned_groups_flat[group].detach()
                else:
                    layout = ShardLayout.from_deepspeed(zero, group)
                    full = [p.detach().float() for p in groups[group]]
                    local = zero.single_partition_of_fp32_groups[group].detach()
                cut = layout.local(full)
                held = sum(s.length for s in layout.segments)
                held_mask = torch.zeros(layout.local_numel, dtype=torch.bool)
                for seg in layout.segments:
                    held_mask[seg.start:seg.start + seg.length] = True
                # padding is not compared: ZeRO-3 leaves it uninitialised
                report.append({"equal": bool(torch.equal(cut[held_mask], local[held_mask])),
                               "local_numel": layout.local_numel, "held": held, "params": len(full),
                               "shapes": [list(s) for s in layout.shapes]})
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedCPUStrategy(stage=stage), max_steps=1,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_model_summary=False, callbacks=[Check()])
    # odd sizes: 64*13 + 13 + 13*7 + 7 elements, so a partition boundary falls inside a weight's row
    trainer.fit(MLPClassifier(hidden=[13, 7]), datamodule=DigitsDataModule(batch_size=32))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
