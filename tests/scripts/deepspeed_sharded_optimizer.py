"""A per-tensor optimizer under a live 2-process DeepSpeed ZeRO-1/2 run (CPU) against the same optimizer on full
tensors fed the same gradients: before each step the full fp32 weights and averaged gradients are gathered
(``safe_get_full_*``), a reference copy of the optimizer steps on them, and after DeepSpeed's step the gathered
weights are compared. ``naive`` replaces the statistics' all-reduce by nothing (shard-local statistics); ``deep``
trains a model with twice the layers; ``noscatter`` turns ZeRO-2's reduce-scatter of gradients off (all-reduce). Every rank also records how many statistic all-reduces each step made.

    python tests/scripts/deepspeed_sharded_optimizer.py OUT STAGE OPTIMIZER [naive] [deep] [noscatter]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

OPTIMIZERS = {"AdamP": dict(lr=3e-2, weight_decay=1e-2, nesterov=True),
              "SGDP": dict(lr=0.2, momentum=0.9, weight_decay=1e-3, nesterov=True),
              "FAdam": dict(lr=3e-2, clip=0.1),
              "AdamW": dict(lr=3e-2, weight_decay=1e-2)}  # torch's: the harness's noise floor
STEPS = 6


def build(name: str, params: list, **extra):
    """The optimizer under test on ``params`` (the module's, or the reference's full copies, in the same order)."""
    import torch

    import lightning_ext.optimizers as ours

    if name == "LAWN":  # the first hidden weight (scale-invariant under BN) and the head, per row, with projection
        base = torch.optim.SGD(params, lr=0.2, momentum=0.9)
        matrices = [p for p in params if p.dim() == 2]
        return ours.LAWN(base, [matrices[0], matrices[-1]], free_steps=2, norm_scope="row", project_grad=True)
    cls = torch.optim.AdamW if name == "AdamW" else getattr(ours, name)
    return cls(params, **OPTIMIZERS[name], **extra)


def main(out: Path, stage: int, name: str, naive: bool, deep: bool, scatter: bool) -> None:
    import lightning.pytorch as pl
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier
    from lightning_ext.optimizers import _sharding
    from lightning_ext.strategies import DeepSpeedCPUStrategy

    calls = [0]
    reduce = _sharding.all_reduce

    def counted(tensor, group):
        calls[0] += 1
        if not naive:
            reduce(tensor, group)

    _sharding.all_reduce = counted

    class Model(MLPClassifier):
        def configure_optimizers(self):
            return build(name, list(self.parameters()))

    class Compare(pl.Callback):
        reference = copies = None
        worst: list = []
        collectives: list = []

        def _params(self, pl_module):
            return [p for p in pl_module.parameters() if p.requires_grad]

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            params = self._params(pl_module)
            grads = [safe_get_full_grad(p).detach().clone() for p in params]  # collectives: every rank calls
            if self.reference is None:
                self.copies = [torch.nn.Parameter(safe_get_full_fp32_param(p).detach().clone()) for p in params]
                self.reference = build(name, self.copies, **({} if name == "LAWN" else {"foreach": False}))
            for c, g in zip(self.copies, grads):
                c.grad = g
            self.reference.step()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            after = [safe_get_full_fp32_param(p).detach() for p in self._params(pl_module)]
            self.worst.append(max(float((a - c.detach()).abs().max()) for a, c in zip(after, self.copies)))
            self.collectives.append(calls[0])
            calls[0] = 0

    compare = Compare()
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedCPUStrategy(stage=stage, reduce_scatter=scatter), max_steps=STEPS,
                         logger=False, enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                         enable_model_summary=False, callbacks=[compare])
    # odd widths: partition boundaries fall inside rows; BatchNorm makes the hidden weights scale-invariant
    hidden = [13, 7, 11, 5] if deep else [13, 7]
    trainer.fit(Model(hidden=hidden, batch_norm=True), datamodule=DigitsDataModule(batch_size=32))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"worst": compare.worst,
                                                                     "collectives": compare.collectives}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], "naive" in sys.argv[4:], "deep" in sys.argv[4:],
         "noscatter" not in sys.argv[4:])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
