"""The manifest's callbacks: :class:`Manifest` records and checks the optimizer stack of a run;
:class:`LoadWeights` starts a new run from a checkpoint's weights (a fine-tune with another stack).

Every technique callback adds a :class:`Manifest` to its trainer (and the CLI adds one to every trainer), so a
checkpoint of a run with only an optimizer from the suite (``optimizer: lightning_ext.optimizers.AdamP`` in
YAML) still records what trained it. See :mod:`lightning_ext.manifest` for what is compared and when.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from lightning_ext._checks import check_bool, check_str
from lightning_ext.manifest import (MANIFEST_KEY, check_manifest, check_optimizers, load_checkpoint_dict,
                                    write_optimizers)


class Manifest(pl.Callback):
    """Writes the optimizer stacks into every checkpoint; on resume, refuses a trainer whose techniques
    (``setup``, before any weight loads) or optimizers (``on_fit_start``, before their state loads) differ."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_manifest(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_optimizers(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        write_optimizers(trainer, checkpoint)


def ensure_manifest(trainer: pl.Trainer) -> None:
    """Add a :class:`Manifest` to ``trainer`` unless it has one (idempotent; called from ``setup`` hooks, whose
    loop then reaches the new callback too)."""
    if not any(isinstance(cb, Manifest) for cb in trainer.callbacks):
        trainer.callbacks.append(Manifest())


class LoadWeights(pl.Callback):
    """Start a run from the weights of ``ckpt_path`` — nothing else: no optimizer state, step, data position or
    technique state, and no manifest check. For a fine-tune whose techniques or optimizer differ from the ones
    the checkpoint was trained with (a quick-start checkpoint fine-tuned with QuEST; AdamP weights trained on
    with SGDP), which ``trainer.fit(ckpt_path=...)`` refuses.

    The weights load in ``setup``, before any technique's surgery (each technique's ``setup`` asks this callback
    first, wherever it stands in the callback list), so they must fit the model as built: ``strict=True`` names
    the missing and unexpected keys otherwise. A checkpoint *file* (Lightning's ``state_dict``); for a DeepSpeed
    checkpoint directory, convert it first (``lightning.pytorch.utilities.deepspeed
    .convert_zero_checkpoint_to_fp32_state_dict``).

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_ext.callbacks.LoadWeights
              init_args: {ckpt_path: lightning_logs/quickstart/version_0/checkpoints/last.ckpt}
            - class_path: lightning_ext.callbacks.QuEST
    """

    def __init__(self, ckpt_path: str | Path, strict: bool = True) -> None:
        check_str("ckpt_path", str(ckpt_path) if isinstance(ckpt_path, Path) else ckpt_path)
        check_bool("strict", strict)
        self.ckpt_path, self.strict = str(ckpt_path), strict
        self._loaded_into: int | None = None

    def load(self, pl_module: pl.LightningModule) -> None:
        """Load the weights into ``pl_module`` once (later calls do nothing)."""
        if self._loaded_into == id(pl_module):
            return
        if Path(self.ckpt_path).is_dir():
            raise ValueError(f"LoadWeights: {self.ckpt_path} is a directory (a sharded checkpoint); convert it to one "
                             "file first (lightning.pytorch.utilities.deepspeed.convert_zero_checkpoint_to_fp32_"
                             "state_dict, or torch.distributed.checkpoint.format_utils.dcp_to_torch_save)")
        checkpoint = load_checkpoint_dict(self.ckpt_path)
        if "state_dict" not in checkpoint:
            raise ValueError(f"LoadWeights: {self.ckpt_path} holds no 'state_dict' (keys: {sorted(checkpoint)[:8]})")
        result = pl_module.load_state_dict(checkpoint["state_dict"], strict=False)
        if self.strict and (result.missing_keys or result.unexpected_keys):
            trained = [e.get("name") for e in checkpoint.get(MANIFEST_KEY, {}).get("techniques", [])]
            raise RuntimeError(
                f"LoadWeights: the weights of {self.ckpt_path} do not fit this model: missing "
                f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]} (the checkpoint was trained "
                f"with techniques {trained or 'none'}). Pass strict=False to load the keys that fit.")
        self._loaded_into = id(pl_module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.load(pl_module)


def load_pending_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Let every :class:`LoadWeights` of ``trainer`` load now (before a technique's surgery)."""
    for cb in trainer.callbacks:
        if isinstance(cb, LoadWeights):
            cb.load(pl_module)
