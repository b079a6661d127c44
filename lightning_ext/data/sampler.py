"""A distributed sampler that resumes mid-epoch exactly.

Lightning restores weights, optimizer and loop counters from a checkpoint, but a plain
``DataLoader`` restarts its epoch from the first batch, so a run resumed mid-epoch sees
different batches than a run that never stopped. :class:`ResumableSampler` is torch's
``DistributedSampler`` (deterministic permutation from ``seed + epoch``, one shard per rank;
Lightning calls ``set_epoch`` and leaves a ``DistributedSampler`` alone) that also knows how
many batches of the current epoch were consumed and skips them when iterated again. The
owning datamodule counts batches in ``on_after_batch_transfer`` (batches that reached
``training_step``, not batches the loop prefetched) and saves the count in its
``state_dict``, which Lightning writes into every checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    def __init__(self, dataset: Sized, batch_size: int, shuffle: bool = True, seed: int = 0,
                 epoch: int = 0, consumed_batches: int = 0) -> None:
        if dist.is_available() and dist.is_initialized():
            num_replicas, rank = dist.get_world_size(), dist.get_rank()
        else:
            num_replicas, rank = 1, 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=True)
        self.batch_size = batch_size
        self.epoch = epoch
        self.consumed_batches = consumed_batches

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.consumed_batches = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.consumed_batches * self.batch_size:])
