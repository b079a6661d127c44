"""Split digits: a task-incremental sequence over scikit-learn's bundled digits (no download).

Task ``t`` holds the classes ``tasks[t]`` (default {0,1}, {2,3}, ..., {8,9}) with labels renumbered
0..k-1; each class is split 60/20/20 into train / val / test by a fixed permutation (stratified).
Batches are ``(x, y, task)`` so a model with one head per task can pick its head.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.data.resumable import ResumableDataModule

DEFAULT_TASKS = [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]


class SplitDigitsDataModule(ResumableDataModule):
    """One task of the split-digits sequence.

    Args:
        task: index into ``tasks`` (the CLNP callback reads it as the task id).
        tasks: the class groups, one per task (default five pairs).
        batch_size, seed, num_workers: as :class:`~lightning_ext.data.DigitsDataModule`.
        split_seed: seed of the per-class 60/20/20 split.
    """

    num_features = 64

    def __init__(self, task: int = 0, tasks: list[list[int]] | None = None, batch_size: int = 32, seed: int = 0,
                 split_seed: int = 0, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        self.tasks = [list(t) for t in (tasks or DEFAULT_TASKS)]
        if not self.tasks or any(not t or any(not 0 <= c < 10 for c in t) for t in self.tasks):
            raise ValueError(f"tasks must be non-empty lists of labels in 0..9, got {self.tasks}")
        if not 0 <= task < len(self.tasks):
            raise ValueError(f"task must be in [0, {len(self.tasks) - 1}], got {task}")
        self.task, self.split_seed = task, split_seed

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def splits(self, task: int) -> dict[str, TensorDataset]:
        """``{"train", "val", "test"}`` datasets of any task of the sequence."""
        x, y = load_digits_tensors()
        g = torch.Generator().manual_seed(self.split_seed)
        parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
        for local, label in enumerate(self.tasks[task]):
            idx = (y == label).nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            n_train, n_val = int(0.6 * len(idx)), int(0.2 * len(idx))
            for name, part in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val]),
                               ("test", idx[n_train + n_val:])):
                parts[name].append(torch.stack([part, torch.full_like(part, local)], dim=1))
        out = {}
        for name, chunks in parts.items():
            rows = torch.cat(chunks)
            rows = rows[rows[:, 0].argsort()]  # a fixed order, independent of the class loop
            out[name] = TensorDataset(x[rows[:, 0]], rows[:, 1], torch.full((len(rows),), task, dtype=torch.int64))
        return out

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        parts = self.splits(self.task)
        self.train_set, self.val_set, self.test_set = parts["train"], parts["val"], parts["test"]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
