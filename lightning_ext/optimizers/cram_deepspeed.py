"""CrAM's second pass under DeepSpeed ZeRO-1/2: the full gradients in, this rank's gradient fragments out.

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
and CrAM restores the model's parameters from its own copy before that. ZeRO-3 (partitioned parameters) is not
covered here. Both collectives go through ``_sharding.all_reduce`` (two per step), which the tests count and
replace by a no-op for the shard-local negative control.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_ext.optimizers import _sharding


def zero12_parameters(zero) -> list[nn.Parameter]:
    """The model parameters a DeepSpeed ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) trains, in its order."""
    return [p for group in zero.bit16_groups for p in group]


def _flat_views(params: list[nn.Parameter], dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
    views, at = [], 0
    for p in params:
        views.append(flat[at:at + p.numel()].view(p.shape))
        at += p.numel()
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
    flat, views = _flat_views(params, torch.float32)
    for p, view in zip(params, views):
        held = _fragment(p)
        if held is not None:
            fragment, start, numel = held
            view.view(-1)[start:start + numel] = fragment.reshape(-1).to(torch.float32)
    _sharding.all_reduce(flat, group)
    return views


def empty_gradients(params: list[nn.Parameter]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A zero fp32 buffer for pass 2's gradients and its per-parameter views."""
    return _flat_views(params, torch.float32)


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
