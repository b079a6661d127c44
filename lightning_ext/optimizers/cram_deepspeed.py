"""CrAM's second pass under DeepSpeed ZeRO-1/2/3: the full gradients in, this rank's gradient pieces out.

Written by hand (DeepSpeed has no two-pass optimizer to reuse). Under ZeRO-1/2 the model's parameters stay whole
on every rank; only the fp32 master weights, the optimizer state and — after the accumulation boundary's
reduction — the gradients are partitioned: each parameter holds a fragment address (``_hp_mapping``:
``lp_fragment_address`` in the flattened parameter, and a view of this rank's averaged gradient for it). So:

* :func:`full_gradients`: each rank writes its fragments of pass 1's averaged gradient into a zero buffer the
  size of every parameter together; one all-reduce (sum) makes the full gradient on every rank — each element is
  held by exactly one rank. CrAM perturbs and compresses the model's own (replicated) parameters with it, so
  every rank computes the same masks without any selection across ranks.
* pass 2 is computed **outside** DeepSpeed's gradient machinery: ``torch.autograd.grad`` on the replayed
  micro-batches returns the gradients without accumulating into ``.grad``, so ZeRO's post-accumulate hooks
  (which reduce into its partitioned buffers and count the backward) never fire; :func:`average` sums them over
  ranks in one all-reduce and divides by the world size, as ZeRO's reduction averages pass 1.
* :func:`write_fragments`: CrAM's final gradient (masked pass 2, plus pass 1 for CrAM+) goes back into this rank's
  fragments, which the engine's ``step`` then flattens into the fp32 partition as it would pass 1's alone.

The fp32 master partitions are never touched: the engine copies them into the model's parameters after its step,
and CrAM restores the model's parameters from its own copy before that.

**ZeRO-3** partitions the parameters too: CrAM perturbs and compresses this rank's piece of each (a view of its
``ds_tensor``, which the next forward all-gathers; a persistent parameter, kept whole on every rank, whole), with
the global top-k threshold found across the pieces (:mod:`lightning_ext.nn.sharded_masks`, 4 all-reduces in
fp32), N:M masks from the all-gathered prunable partitions (a group of M can be cut by a boundary); the gradients are read and written per partition (``safe_get_local_grad`` / ``safe_set_local_grad``).
The two gradient buffers are the size of the whole model on every rank (as the reduced gradient of a ZeRO-1/2
step is before partitioning): CrAM under ZeRO-3 saves the parameters' and optimizer state's memory, not the
gradients'. A prunable parameter must be partitioned (``stage3_param_persistence_threshold: 0`` for small
ones). Both collectives go through ``_sharding.all_reduce`` (two per step), which the tests count and
replace by a no-op for the shard-local negative control.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_ext.optimizers import _sharding


def zero12_parameters(zero) -> list[nn.Parameter]:
    """The model parameters a DeepSpeed ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) trains, in its order."""
    return [p for group in zero.bit16_groups for p in group]


def _flat_views(shapes: list[torch.Size], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zero fp32 buffer holding tensors of ``shapes`` one after another, and its view of each."""
    numels = [math.prod(shape) for shape in shapes]
    flat = torch.zeros(sum(numels), dtype=torch.float32, device=device)
    views, at = [], 0
    for shape, numel in zip(shapes, numels):
        views.append(flat[at:at + numel].view(shape))
        at += numel
    return flat, views


def _fragment(p: nn.Parameter) -> tuple[torch.Tensor, int, int] | None:
    """This rank's averaged-gradient fragment of ``p`` and where it sits in the flattened parameter."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return mapping.get_lp_grad_fragment(p._index_in_param_group), address.start, address.numel


@torch.no_grad()
def full_gradients(params: list[nn.Parameter], group) -> list[torch.Tensor]:
    """Pass 1's averaged gradient of every parameter, whole on every rank (one all-reduce of the fragments)."""
    flat, views = empty_gradients(params)
    for p, view in zip(params, views):
        held = _fragment(p)
        if held is not None:
            fragment, start, numel = held
            view.view(-1)[start:start + numel] = fragment.reshape(-1).to(torch.float32)
    _sharding.all_reduce(flat, group)
    return views


def empty_gradients(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zero fp32 buffer for pass 2's gradients and its per-parameter views."""
    return _flat_views([p.shape for p in params], params[0].device)


@torch.no_grad()
def average(flat: torch.Tensor, group) -> None:
    """Sum ``flat`` over the ranks of ``group`` and divide by their number (ZeRO's gradient averaging)."""
    _sharding.all_reduce(flat, group)
    flat.div_(torch.distributed.get_world_size(group))


@torch.no_grad()
def write_fragments(params: list[nn.Parameter], grads: list[torch.Tensor]) -> None:
    """Put this rank's fragments of ``grads`` where the engine's ``step`` reads its averaged gradient."""
    for p, grad in zip(params, grads):
        held = _fragment(p)
        if held is not None:
            fragment, start, numel = held
            fragment.copy_(grad.reshape(-1)[start:start + numel].reshape_as(fragment).to(fragment.dtype))


# --- ZeRO-3: parameters partitioned too ----------------------------------------------------------------------


def zero3_parameters(zero) -> list[nn.Parameter]:
    """The model parameters a DeepSpeed ZeRO-3 optimizer trains, in its order (each with ``ds_tensor``, this
    rank's flat piece of it, ``ds_numel`` elements in all)."""
    return [p for group in zero.fp16_groups for p in group]


def _span(p: nn.Parameter, rank: int) -> tuple[int, int]:
    """``(start, valid)``: where this rank's piece of ``p`` starts in the flattened parameter and how many of its
    ``ds_tensor`` elements are real (the last ranks' pieces are padded)."""
    part = p.ds_tensor.numel()
    start = min(rank * part, p.ds_numel)
    return start, max(0, min(part, p.ds_numel - start))


def zero3_pieces(params: list[nn.Parameter], rank: int) -> list[torch.Tensor]:
    """What CrAM perturbs and restores: this rank's real piece of each partitioned parameter (a view of its
    ``ds_tensor``, which the next forward all-gathers), or the whole data of a persistent one (kept whole on every
    rank, below ``stage3_param_persistence_threshold``)."""
    pieces = []
    for p in params:
        if getattr(p, "ds_persist", False):
            pieces.append(p.data)
        else:
            _, valid = _span(p, rank)
            pieces.append(p.ds_tensor.data.view(-1)[:valid])
    return pieces


def zero3_full_gradients(params: list[nn.Parameter], rank: int, group) -> list[torch.Tensor]:
    """Pass 1's averaged gradient of every parameter, whole on every rank: each rank writes its partition of the
    gradient (``safe_get_local_grad``) into a zero buffer, one all-reduce (sum)."""
    from deepspeed.utils import safe_get_local_grad

    flat, views = zero3_empty_gradients(params)
    for p, view in zip(params, views):
        start, valid = _span(p, rank)
        local = safe_get_local_grad(p)
        if local is not None and valid:
            view.view(-1)[start:start + valid] = local.reshape(-1)[:valid].to(torch.float32)
    _sharding.all_reduce(flat, group)
    return views


def zero3_empty_gradients(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zero fp32 buffer for pass 2's full gradients (by ``ds_shape``) and its per-parameter views."""
    return _flat_views([torch.Size(p.ds_shape) for p in params], params[0].ds_tensor.device)


def zero3_pieces_of(params: list[nn.Parameter], full: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """The pieces (as :func:`zero3_pieces`) of full tensors: views, so writing a piece writes the full tensor."""
    pieces = []
    for p, t in zip(params, full):
        if getattr(p, "ds_persist", False):
            pieces.append(t)
        else:
            start, valid = _span(p, rank)
            pieces.append(t.view(-1)[start:start + valid])
    return pieces


@torch.no_grad()
def zero3_write_gradients(params: list[nn.Parameter], full: list[torch.Tensor], rank: int) -> None:
    """Put this rank's partition of each full gradient where ZeRO-3's ``step`` reads it (``safe_set_local_grad``;
    the padding stays zero)."""
    from deepspeed.utils import safe_set_local_grad

    for p, grad in zip(params, full):
        start, valid = _span(p, rank)
        value = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32)
        value[:valid] = grad.reshape(-1)[start:start + valid]
        safe_set_local_grad(p, value)


# --- the whole second pass, for any caller -------------------------------------------------------------------

def second_pass(cram, zero, pass_two) -> None:
    """CrAM's second pass at a DeepSpeed engine's accumulation boundary, after pass 1's backward and before
    ``engine.step()``: ``pass_two(params, grads)`` must add this rank's local pass-2 gradient of every parameter
    into ``grads`` (full-shape fp32 views, in ``params`` order) without accumulating into ``.grad``
    (``torch.autograd.grad``), with the loss scaled as pass 1's was. ``cram`` is the CrAM wrapper the engine's
    ZeRO optimizer ``zero`` steps."""
    if hasattr(zero, "fp32_partitioned_groups_flat"):
        return _second_pass_zero3(cram, zero, pass_two)
    if not hasattr(zero, "bit16_groups") or not hasattr(zero, "dp_process_group"):
        raise RuntimeError(f"CrAM under DeepSpeed needs a ZeRO optimizer; the engine runs {type(zero).__name__} "
                           "(DeepSpeed's BF16 optimizer), not supported")
    params = zero12_parameters(zero)
    group = zero.dp_process_group
    cram.perturb(params, full_gradients(params, group))
    flat, grads = empty_gradients(params)
    try:
        pass_two(params, grads)
        average(flat, group)
    finally:
        cram.restore(grads)
    write_fragments(params, grads)


def _second_pass_zero3(cram, zero, pass_two) -> None:
    import dataclasses

    import torch.distributed as dist

    from lightning_ext.nn.sharded_masks import Collectives
    from lightning_ext.optimizers.cram import LocalShards

    params = zero3_parameters(zero)
    group = zero.dp_process_group
    rank = dist.get_rank(group)
    persistent = [p for p in cram.prunable if getattr(p, "ds_persist", False)]
    if persistent:
        raise RuntimeError("CrAM under DeepSpeed ZeRO-3 needs every prunable parameter partitioned; "
                           f"{len(persistent)} are kept whole on every rank (below stage3_param_persistence_threshold). "
                           "Set it to 0, e.g. DeepSpeedCPUStrategy(stage=3, param_persistence_threshold=0).")
    pieces = zero3_pieces(params, rank)
    piece_of = {id(p): t for p, t in zip(params, pieces)}
    comm = dataclasses.replace(Collectives.of_group(group), all_reduce=lambda t: _sharding.all_reduce(t, group))
    cram.local_shards = LocalShards([piece_of[id(p)] for p in cram.prunable], [p.ds_numel for p in cram.prunable],
                                    comm, lambda n, m: zero3_nm_masks(cram.prunable, rank, group, n, m))
    try:
        cram.perturb(pieces, zero3_pieces_of(params, zero3_full_gradients(params, rank, group), rank))
        flat, grads = zero3_empty_gradients(params)
        try:
            pass_two(params, grads)
            average(flat, group)
        finally:
            cram.restore(zero3_pieces_of(params, grads, rank))
    finally:
        cram.local_shards = None
    zero3_write_gradients(params, grads, rank)


@torch.no_grad()
def zero3_nm_masks(params: list[nn.Parameter], rank: int, group, n: int, m: int) -> list[torch.Tensor | None]:
    """N:M masks of this rank's pieces of ZeRO-3 partitioned parameters: a group of M can be cut by a partition
    boundary, so the partitions (equal-size, padded) of every prunable parameter are all-gathered in one
    collective, each full tensor is masked (:func:`lightning_ext.nn.pruning.nm_mask`) and this rank keeps its
    piece of the mask (``None`` where the tensor does not tile into groups of M)."""
    import torch.distributed as dist

    from lightning_ext.nn.pruning import nm_mask

    world = dist.get_world_size(group)
    local = torch.cat([p.ds_tensor.data.reshape(-1) for p in params])
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    masks, at = [], 0
    for p in params:
        part = p.ds_tensor.numel()
        full = torch.cat([g[at:at + part] for g in gathered])[:p.ds_numel].view(p.ds_shape)
        mask = nm_mask(full, n, m)
        start, valid = _span(p, rank)
        masks.append(None if mask is None else mask.reshape(-1)[start:start + valid])
        at += part
    return masks
