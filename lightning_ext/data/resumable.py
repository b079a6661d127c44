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

    The checkpointed state is ``(epoch, batches consumed in that epoch)``; on resume the
    sampler skips exactly those batches, so a stopped-and-resumed run trains on the batches
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
        self._sampler = ResumableSampler(self.train_set, self.batch_size, seed=self.seed, **self.state_dict())
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
        return {"epoch": self._sampler.epoch, "consumed_batches": self._sampler.consumed_batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_state = {"epoch": int(state_dict["epoch"]),
                              "consumed_batches": int(state_dict["consumed_batches"])}
        self._sampler = None  # the next train_dataloader() call builds one from the loaded state
