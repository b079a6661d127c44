"""CrAM's compression masks when each rank holds only a shard of every tensor: exactly the unsharded masks.

Written by hand: no library selects a global top-k over sharded tensors exactly (per-shard top-k, what
public sharded pruners do, keeps a different set). Two pieces, each with the collectives it needs passed in
(:class:`Collectives`), so the same code runs under ``torch.distributed`` and in a single-process simulation
of several ranks (the unit tests):

* **top-k** (:func:`sharded_topk_masks`): the threshold is the exact k-th smallest magnitude over every rank,
  found by a radix select on the float bit patterns (:func:`kth_smallest_sharded`): for non-negative floats the
  bit patterns order as the values do, so 8 bits at a time, each rank counts its candidates per byte value,
  one all-reduce sums the 256-bin histograms, and the byte holding the k-th value is fixed. 4 rounds for
  fp32 (2 for bf16/fp16, 8 for fp64), all tensors of a per-layer selection in the same rounds: the number of
  collectives does not grow with the number of tensors. Ties at the threshold are dropped on every rank (the
  mask is ``|w| > threshold``), as :func:`lightning_ext.nn.pruning.topk_masks` drops them, so the masks equal
  the unsharded ones without a tie-break between ranks.
* **N:M** (:func:`sharded_nm_masks`) on dim-0 shards (FSDP2's layout: each rank holds whole rows): groups run
  along a row (:func:`lightning_ext.nn.pruning.nm_mask`), so where a row's length is a multiple of ``M`` the
  groups are local. Where it is not, groups straddle rows and may straddle ranks: those tensors (odd shapes,
  rare and small in practice) are all-gathered, all of them in one collective, and each rank keeps its rows
  of the full mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lightning_ext.nn.pruning import nm_mask

_INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Collectives:
    """What the sharded masks need of a process group: this rank, the world size, an in-place sum over ranks
    and a gather of one equal-size tensor per rank (in rank order)."""

    rank: int
    world: int
    all_reduce: Callable[[torch.Tensor], None]
    all_gather: Callable[[torch.Tensor], list[torch.Tensor]]

    @classmethod
    def of_group(cls, group=None) -> Collectives:
        import torch.distributed as dist

        world = dist.get_world_size(group)

        def all_reduce(t: torch.Tensor) -> None:
            dist.all_reduce(t, group=group)

        def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
            out = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(out, t.contiguous(), group=group)
            return out

        return cls(dist.get_rank(group), world, all_reduce, all_gather)


def kth_smallest_sharded(segments: Sequence[torch.Tensor], ks: Sequence[int],
                         all_reduce: Callable[[torch.Tensor], None]) -> list[torch.Tensor]:
    """The ``ks[i]``-th smallest (1-based) value of segment ``i`` over every rank, where ``segments[i]`` holds
    this rank's part (flat, non-negative, one floating dtype; possibly empty). Every rank calls it with the
    same ``ks``; the answers are 0-d tensors, identical on every rank. ``8 * itemsize / 8`` all-reduces of a
    ``[len(segments), 256]`` int64 histogram."""
    if not segments:
        return []
    dtype = segments[0].dtype
    if any(s.dtype != dtype for s in segments) or not dtype.is_floating_point:
        raise ValueError(f"segments must share one floating dtype, got {sorted({str(s.dtype) for s in segments})}")
    int_dtype = _INT_OF[dtype.itemsize]
    candidates = [s.detach().reshape(-1).contiguous().view(int_dtype) for s in segments]
    count = len(candidates)
    k = torch.tensor(list(ks), dtype=torch.int64)
    prefix = torch.zeros(count, dtype=torch.int64)
    for shift in range(8 * dtype.itemsize - 8, -1, -8):
        digits = [((c >> shift) & 255).long() for c in candidates]
        histogram = torch.stack([torch.bincount(d, minlength=256) for d in digits])
        all_reduce(histogram)
        below = histogram.cumsum(1)
        digit = (below < k[:, None]).sum(1)  # the byte value holding the k-th smallest
        if bool((digit > 255).any()):
            raise ValueError(f"k {k.tolist()} exceeds the number of values {below[:, -1].tolist()}")
        k -= torch.where(digit > 0, below.gather(1, (digit - 1).clamp(min=0)[:, None])[:, 0], 0)
        prefix |= digit << shift
        candidates = [c[d == digit[i]] for i, (c, d) in enumerate(zip(candidates, digits))]
    return [prefix[i].to(int_dtype).view(dtype) for i in range(count)]


def sharded_topk_masks(local: Sequence[torch.Tensor], full_numels: Sequence[int], sparsity: float, scope: str,
                       comm: Collectives) -> list[torch.Tensor]:
    """:func:`lightning_ext.nn.pruning.topk_masks` of the full tensors, for this rank's shards ``local`` of
    tensors with ``full_numels`` elements: the same ``ceil(n (1 - sparsity))`` largest magnitudes kept."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    magnitudes = [t.detach().abs().reshape(-1) for t in local]
    if scope == "global":
        segments, totals = [torch.cat(magnitudes)], [sum(full_numels)]
    else:
        segments, totals = magnitudes, list(full_numels)
    drops = [n - math.ceil(n * (1.0 - sparsity)) for n in totals]
    chosen = [i for i, d in enumerate(drops) if d > 0]
    thresholds = dict(zip(chosen, kth_smallest_sharded([segments[i] for i in chosen], [drops[i] for i in chosen],
                                                       comm.all_reduce)))
    masks = []
    for i, t in enumerate(local):
        threshold = thresholds.get(0 if scope == "global" else i)
        masks.append(torch.ones_like(t, dtype=torch.bool) if threshold is None else t.detach().abs() > threshold)
    return masks


def dim0_rows(rows: int, world: int) -> list[tuple[int, int]]:
    """Each rank's ``[start, stop)`` rows of a dim-0 shard (``torch.chunk``, FSDP2's split; trailing ranks
    may hold none)."""
    size = -(-rows // world) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def sharded_nm_masks(local: Sequence[torch.Tensor], full_shapes: Sequence[torch.Size], n: int, m: int,
                     comm: Collectives) -> list[torch.Tensor | None]:
    """:func:`lightning_ext.nn.pruning.nm_mask` of the full tensors, for this rank's dim-0 shards ``local``
    (rows split as :func:`dim0_rows`); ``None`` where the full tensor does not tile into groups of ``m``."""
    masks: list[torch.Tensor | None] = []
    straddling: list[int] = []
    for i, (t, shape) in enumerate(zip(local, full_shapes)):
        numel = math.prod(shape)
        if len(shape) < 2 or numel % m:
            masks.append(None)
        elif (numel // shape[0]) % m == 0:  # whole groups in every row: local
            masks.append(nm_mask(t, n, m) if t.numel() else torch.zeros_like(t, dtype=torch.bool))
        else:
            masks.append(None)
            straddling.append(i)
    if not straddling:
        return masks
    spans = {i: dim0_rows(full_shapes[i][0], comm.world) for i in straddling}
    row = {i: math.prod(full_shapes[i][1:]) for i in straddling}
    width = {i: max(b - a for a, b in spans[i]) * row[i] for i in straddling}
    buffer = torch.zeros(sum(width.values()), dtype=local[straddling[0]].dtype)
    at = 0
    for i in straddling:
        flat = local[i].detach().reshape(-1)
        buffer[at:at + flat.numel()] = flat
        at += width[i]
    gathered = comm.all_gather(buffer)
    at = 0
    for i in straddling:
        full = torch.cat([gathered[r][at:at + (b - a) * row[i]] for r, (a, b) in enumerate(spans[i])])
        start, stop = spans[i][comm.rank]
        masks[i] = nm_mask(full.view(full_shapes[i]), n, m)[start:stop]
        at += width[i]
    return masks
