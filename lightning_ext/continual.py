"""A task sequence as successive fits (the CLNP callback carries the state between them).

Python::

    from lightning_ext.continual import fit_task_sequence
    clnp = CLNP(l1=1e-3, margin=0.015, checkpoint_dir="clnp_tasks")
    fit_task_sequence(ContinualMLP(), [SplitDigitsDataModule(task=t) for t in range(5)],
                      lambda t: pl.Trainer(max_epochs=60, callbacks=[clnp]), clnp)

YAML (one process per task; ``checkpoint_dir`` carries the result of each task to the next)::

    for t in 0 1 2 3 4; do lightning fit --config configs/clnp.yaml --data.init_args.task $t; done

Stopping between tasks loses nothing: finished tasks are skipped (their ``task<t>.pt`` is loaded);
inside a task, resume with Lightning's ``ckpt_path`` as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_ext.callbacks.clnp import CLNP

__all__ = ["fit_task_sequence"]


def fit_task_sequence(model: pl.LightningModule, datamodules: Sequence[pl.LightningDataModule],
                      make_trainer: Callable[[int], pl.Trainer], clnp: CLNP,
                      after_task: Callable[[int, pl.LightningModule], None] | None = None) -> list[dict[str, Any]]:
    """Fit ``datamodules[t]`` for t = 0, 1, ... with ``make_trainer(t)`` (whose callbacks include ``clnp``).

    Tasks already finished (in ``clnp``'s state, or saved under its ``checkpoint_dir``) are skipped.
    ``after_task(t, model)`` runs after each task trained here. Returns the per-task history.
    """
    for task, datamodule in enumerate(datamodules):
        if clnp.state["finished"] > task:
            continue
        if clnp.checkpoint_dir is not None and clnp.task_file(task).is_file():
            clnp.load_task(model, task)
            continue
        trainer = make_trainer(task)
        if not any(cb is clnp for cb in trainer.callbacks):
            raise ValueError("fit_task_sequence: make_trainer(task) must return a Trainer whose callbacks include "
                             "the CLNP callback passed here")
        trainer.fit(model, datamodule=datamodule)
        if clnp.state["finished"] != task + 1:
            raise RuntimeError(f"CLNP: task {task} did not finish (fit interrupted?); rerun to resume it")
        if after_task is not None:
            after_task(task, model)
    return clnp.state["history"]
