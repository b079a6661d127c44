"""Progress display: a training bar that counts optimizer steps out of ``max_steps``, and bars for setup work.

Lightning's bar counts the batches of the current epoch and titles it ``Epoch e/{max_epochs - 1}``; a run bounded
by ``max_steps`` has ``max_epochs = -1``, so the title reads ``Epoch 0/-2`` and the count restarts every epoch.
:class:`StepProgressBar` (a :class:`~lightning.pytorch.callbacks.RichProgressBar`) shows ``step 120/300`` across
epochs when ``max_steps`` is set, keeps Lightning's epoch display otherwise, and leaves out ``v_num`` (the logger
version, which says nothing about the run's progress). ``lightning-ext`` adds it unless the config names a
progress bar or disables it.

:func:`setup_progress` is a plain bar for long work outside the training loop (EVA/GoRA calibration, CLNP
between tasks): on rank 0 only, and only when the trainer shows a progress bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["StepProgressBar", "setup_bar", "setup_progress"]

T = TypeVar("T")


class StepProgressBar(RichProgressBar):
    """Rich progress bar counting optimizer steps out of ``max_steps`` (epochs when only ``max_epochs`` is set)."""

    def _counts_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._counts_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._counts_steps():
            return super()._get_train_description(current_epoch)
        description = f"step (epoch {current_epoch})"
        return f"{description:{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._counts_steps():  # Lightning resets the bar to 0 each epoch; steps go on
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._counts_steps():
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.is_disabled and self.train_progress_bar_id is None:  # a mid-epoch resume
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def setup_bar(trainer: pl.Trainer | None, description: str, total: int | None = None, unit: str = "it") -> Any:
    """A context manager holding a bar with ``update(n=1)``: a tqdm bar when ``trainer`` shows progress (rank 0
    only), else one that shows nothing."""
    shown = trainer is not None and trainer.progress_bar_callback is not None and trainer.is_global_zero
    if not shown:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(desc=description, total=total, unit=unit, leave=False, dynamic_ncols=True)


def setup_progress(trainer: pl.Trainer | None, iterable: Iterable[T], description: str,
                   total: int | None = None) -> Iterator[T]:
    """``iterable`` with a bar titled ``description`` (see :func:`setup_bar`)."""
    with setup_bar(trainer, description, total) as bar:
        for item in iterable:
            yield item
            bar.update()
