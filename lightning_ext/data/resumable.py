"""Base datamodule whose training order survives a mid-epoch resume (see :mod:`.sampler`)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from lightning_ext.data.sampler import ResumableSampler


class _ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes mid-epoch (Lightning checks for ``state_dict`` /
    ``load_state_dict``, and warns "your dataloader is not resumable" otherwise). The position lives in the
    datamodule's state (restored before the loader is built), so the loader's own state is that position, for the
    record, and loading it changes nothing."""

    def __init__(self, *args, owner: ResumableDataModule, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def state_dict(self) -> dict[str, Any]:
        return self._owner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the datamodule's own state_dict carries the position


class ResumableDataModule(pl.LightningDataModule):
    """Subclasses build ``self.train_set`` / ``self.val_set`` in ``setup``.

    The checkpointed state is ``(epoch, batches consumed in that epoch, per-process batch size, world size)``; on
    resume the sampler skips exactly those batches, so a stopped-and-resumed run trains on the batches
    of a run that never stopped.
    """

    train_set: Dataset
    val_set: Dataset

    def __init__(self, batch_size: int, seed: int, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self._loader_state = {"epoch": 0, "consumed_batches": 0}
        self._sampler: ResumableSampler | None = None

    def train_dataloader(self) -> DataLoader:
        # built from state_dict(): a reload (reload_dataloaders_every_n_epochs) continues where the old sampler was
        state = self.state_dict()
        self._sampler = ResumableSampler(self.train_set, self.batch_size, seed=self.seed, epoch=state["epoch"],
                                         consumed_batches=state["consumed_batches"])
        self._sampler.consumed_batches = resumed_position(state, self.batch_size, self._sampler.num_replicas)
        return _ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=self._sampler, drop_last=True,
                                num_workers=self.num_workers, owner=self)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._sampler is not None and self.trainer is not None and self.trainer.training:
            self._sampler.consumed_batches += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        if self._sampler is None:
            return dict(self._loader_state)
        return {"epoch": self._sampler.epoch, "consumed_batches": self._sampler.consumed_batches,
                "batch_size": self._sampler.batch_size, "world_size": self._sampler.num_replicas}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = {k: int(v) for k, v in state_dict.items()
                              if k in ("epoch", "consumed_batches", "batch_size", "world_size")}
        self._sampler = None  # the next train_dataloader() call builds one from the loaded state


def resumed_position(state: dict[str, Any], batch_size: int, world_size: int) -> int:
    """Batches of the epoch to skip per process when a run saved with ``state`` goes on with ``batch_size`` per
    process on ``world_size`` processes. The sampler hands rank r every ``world_size``-th index of one
    permutation, so the ranks together have consumed the first ``consumed × batch × world`` samples of it; the
    resumed run skips the same samples, which must be a whole number of its own global batches — else the resume
    is refused, naming both layouts. (A state without sizes, from an older checkpoint, resumes as it was saved.)"""
    consumed = int(state.get("consumed_batches", 0))
    saved_batch, saved_world = int(state.get("batch_size", batch_size)), int(state.get("world_size", world_size))
    if (saved_batch, saved_world) == (batch_size, world_size):
        return consumed
    samples, per_batch = consumed * saved_batch * saved_world, batch_size * world_size
    if samples % per_batch:
        raise ValueError(
            f"cannot resume mid-epoch: the checkpoint consumed {consumed} batches of {saved_batch} on each of "
            f"{saved_world} processes ({samples} samples of epoch {state.get('epoch', 0)}), which is not a whole "
            f"number of batches of {batch_size} on {world_size} processes ({per_batch} samples per step). Resume "
            "with a layout whose global batch divides it, or from a checkpoint at an epoch boundary.")
    return samples // per_batch
