"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as a datamodule; no download."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_ext.data.resumable import ResumableDataModule


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.int64)


class DigitsDataModule(ResumableDataModule):
    """Digits classification, 64 features in [0, 1].

    Args:
        val_fraction: share of samples held out for validation (a fixed permutation by ``split_seed``).
        classes: keep only these labels (e.g. ``[0, 1]``) — used to build task sequences.
    """

    num_features = 64
    num_classes = 10

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0, split_seed: int = 0,
                 classes: list[int] | None = None, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if classes is not None and (not classes or any(not 0 <= c < 10 for c in classes)):
            raise ValueError(f"classes must be a non-empty list of labels in 0..9, got {classes}")
        self.val_fraction, self.split_seed, self.classes = val_fraction, split_seed, classes

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        x, y = load_digits_tensors()
        if self.classes is not None:
            keep = torch.isin(y, torch.tensor(self.classes))
            x, y = x[keep], y[keep]
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, int(round(self.val_fraction * len(y))))
        self.train_set = TensorDataset(x[perm[n_val:]], y[perm[n_val:]])
        self.val_set = TensorDataset(x[perm[:n_val]], y[perm[:n_val]])
