"""CrAM's masks on shards (lightning_ext/nn/sharded_masks.py), with simulated ranks (threads, no processes):
world sizes 2, 3 and 4 on dim-0 shards (FSDP2's layout) of awkward shapes — (7, 13), (1, N), (N, 1), a tensor
smaller than the world, empty shards, tie-heavy tensors, N:M groups that straddle rows and ranks. The sharded
masks must equal the unsharded ones exactly; a per-shard top-k (what a naive sharded pruner does) is the
negative control and must differ."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from lightning_ext.nn.pruning import nm_mask, topk_masks
from lightning_ext.nn.sharded_masks import (Collectives, dim0_rows, kth_smallest_sharded, sharded_nm_masks,
                                            sharded_topk_masks)

SHAPES = [(7, 13), (1, 29), (29, 1), (2, 3), (3, 5, 2), (4, 4), (6, 6)]
WORLDS = [2, 3, 4]


class SimulatedRanks:
    """``world`` threads in lock step, each with a :class:`Collectives` whose sum and gather run over the
    threads in rank order; counts the collectives of rank 0."""

    def __init__(self, world: int) -> None:
        self.world, self.barrier, self.slots, self.calls = world, threading.Barrier(world), [None] * world, 0

    def _exchange(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        out = [s.clone() for s in self.slots]
        self.barrier.wait()
        if rank == 0:
            self.calls += 1
        return out

    def comm(self, rank: int) -> Collectives:
        def all_reduce(t: torch.Tensor) -> None:
            parts = self._exchange(rank, t)
            t.copy_(sum(parts[1:], parts[0]))

        return Collectives(rank, self.world, all_reduce, lambda t: self._exchange(rank, t))

    def run(self, fn):
        results, errors = [None] * self.world, []

        def target(rank: int) -> None:
            try:
                results[rank] = fn(rank, self.comm(rank))
            except BaseException as error:  # noqa: BLE001 - re-raised below, other ranks released
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


def _tensors(seed: int, shapes=SHAPES, dtype=torch.float64, ties: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if ties:  # few distinct magnitudes of both signs: the threshold falls inside a run of ties
        out = [(t * 2).round() / 2 for t in out]
    return out


def _shard(t: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    start, stop = dim0_rows(t.shape[0], world)[rank]
    return t[start:stop]


def _rebuild(per_rank: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat([masks[i] for masks in per_rank]) for i in range(len(per_rank[0]))]


def test_dim0_rows_are_torch_chunk_and_leave_some_ranks_empty():
    for rows in (1, 2, 7, 29):
        for world in WORLDS:
            spans = dim0_rows(rows, world)
            assert [b - a for a, b in spans if b > a] == [len(c) for c in torch.arange(rows).chunk(world)]
    assert dim0_rows(2, 4)[2:] == [(2, 2), (2, 2)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", WORLDS)
def test_kth_smallest_over_ranks_is_kthvalue_of_everything(world, dtype):
    values = _tensors(3, dtype=dtype, ties=dtype == torch.bfloat16)
    flat = torch.cat([v.abs().reshape(-1) for v in values])
    ks = [1, 2, flat.numel() // 3, flat.numel() - 1, flat.numel()]
    ranks = SimulatedRanks(world)
    found = ranks.run(lambda r, comm: kth_smallest_sharded(
        [torch.cat([_shard(v, world, r).abs().reshape(-1) for v in values])] * len(ks), ks, comm.all_reduce))
    expected = [torch.kthvalue(flat.float() if dtype == torch.bfloat16 else flat, k).values.to(dtype) for k in ks]
    for per_rank in found:
        assert [v.item() for v in per_rank] == [v.item() for v in expected]
    assert ranks.calls == dtype.itemsize  # one all-reduce per byte, whatever the number of segments


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_topk_masks_are_the_unsharded_masks(world, sparsity, scope, ties):
    full = _tensors(5, ties=ties)
    expected = topk_masks(full, sparsity, scope)
    numels = [t.numel() for t in full]
    ranks = SimulatedRanks(world)
    per_rank = ranks.run(lambda r, comm: sharded_topk_masks([_shard(t, world, r) for t in full], numels, sparsity,
                                                            scope, comm))
    assert all(torch.equal(a, b) for a, b in zip(_rebuild(per_rank), expected))
    assert ranks.calls == (0 if sparsity == 0.0 else 8)  # fp64: 8 rounds, for every tensor of "layer" at once
    if ties and sparsity == 0.5:  # the threshold lands on tied magnitudes: they are dropped on every rank
        assert sum(int(m.sum()) for m in expected) < math.ceil(sum(numels) * 0.5) or scope == "layer"


@pytest.mark.parametrize("world", WORLDS)
def test_negative_control_per_shard_topk_differs(world):
    full = _tensors(7)
    expected = topk_masks(full, 0.7, "global")
    naive = [topk_masks([_shard(t, world, r) for t in full if _shard(t, world, r).numel()], 0.7, "global")
             for r in range(world)]
    rebuilt = []
    for i, t in enumerate(full):  # the per-shard masks put back in place (ranks without rows hold none)
        parts, held = [], [r for r in range(world) if _shard(t, world, r).numel()]
        for r in held:
            index = [j for j, u in enumerate(full) if _shard(u, world, r).numel()].index(i)
            parts.append(naive[r][index])
        rebuilt.append(torch.cat(parts))
    assert not all(torch.equal(a, b) for a, b in zip(rebuilt, expected))


NM_SHAPES = [(7, 8), (3, 6), (5, 2), (6, 4, 2, 2), (1, 12), (12, 1), (2, 4), (7, 13)]


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_nm_masks_are_the_unsharded_masks(world, n, m):
    full = _tensors(9, NM_SHAPES, ties=True)
    expected = [nm_mask(t, n, m) for t in full]
    ranks = SimulatedRanks(world)
    per_rank = ranks.run(lambda r, comm: sharded_nm_masks([_shard(t, world, r) for t in full],
                                                          [t.shape for t in full], n, m, comm))
    for i, want in enumerate(expected):
        got = [masks[i] for masks in per_rank]
        if want is None:
            assert all(g is None for g in got)
        else:
            assert torch.equal(torch.cat(got), want), NM_SHAPES[i]
    straddles = any(want is not None and (math.prod(s) // s[0]) % m for s, want in zip(NM_SHAPES, expected))
    assert ranks.calls == (1 if straddles else 0)  # every straddling tensor in one gather
