"""Magnitude masks (global / per-layer top-k, N:M), one-shot pruning, BatchNorm utilities.

Used by CrAM (Peste et al., ICLR 2023) during training and to evaluate its claim afterwards.
Conventions, ours where they differ from the CrAM reference code:

* top-k keeps the ``ceil(n * (1 - sparsity))`` largest magnitudes (exactly that many unless
  magnitudes tie at the threshold, when tied ones are dropped); the threshold is the exact
  k-th smallest magnitude (:func:`kth_smallest`: a subsample brackets it, one pass of a small C++ kernel
  counts the values below the bracket and gathers those inside, ``torch.kthvalue`` runs on these —
  38 ms -> ~3 ms at 2.3 M weights on 2 CPU threads; ATen's kernels where the kernel cannot be built).
  The reference's percentile keeps one fewer;
* N:M groups ``M`` consecutive weights along the GEMM input dimension: the last dimension of a
  Linear weight, the input-channel dimension of a conv weight (viewed as ``(out, kh, kw, in)``),
  as the reference does; a tensor whose size is not a multiple of ``M`` is left dense;
* every ``_BatchNorm`` subclass (SyncBatchNorm included) is handled; the reference covers only
  ``BatchNorm2d``.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def kth_smallest(values: torch.Tensor, k: int, sample: int = 1 << 16,
                 workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Exactly ``torch.kthvalue(values, k).values`` (``k`` is 1-based) of a flat tensor, faster on large ones.

    A strided subsample gives a bracket ``[lo, hi]`` around the target quantile (± 6 standard errors of
    a sample quantile); one counting pass ranks ``lo``, and ``kthvalue`` runs on the bracketed values
    only. If the bracket misses (adversarial orderings), it falls back to ``kthvalue`` on everything.
    ``workspace``: two bool buffers the size of ``values`` for the comparisons (a caller that selects every
    step keeps them: fresh model-sized temporaries page-fault on CPU, 20 -> 75 ms at 2.3 M values).
    """
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    if n <= 8 * sample:
        return torch.kthvalue(values, k).values
    sub = values[:: n // sample]
    m = sub.numel()
    q = k / n
    margin = 6 * math.sqrt(q * (1 - q) / m) + 2 / m
    lo_rank, hi_rank = max(1, math.floor((q - margin) * m)), min(m, math.ceil((q + margin) * m))
    lo, hi = torch.kthvalue(sub, lo_rank).values, torch.kthvalue(sub, hi_rank).values
    kernel = _select_kernel(values)
    if kernel is not None:  # one pass: the count below lo and the values inside [lo, hi]
        below, inside = kernel.bracket_gather(values, lo, hi)
    else:
        below_lo, upto_hi = workspace if workspace is not None else (torch.empty_like(values, dtype=torch.bool),
                                                                     torch.empty_like(values, dtype=torch.bool))
        below = int(torch.lt(values, lo, out=below_lo).count_nonzero())
        inside = values[torch.le(values, hi, out=upto_hi).logical_xor_(below_lo)]  # lo <= v <= hi (lo <= hi)
    rank = k - below
    if 1 <= rank <= inside.numel():
        return torch.kthvalue(inside, rank).values
    return torch.kthvalue(values, k).values


def _select_kernel(values: torch.Tensor):
    """The C++ bracket kernel (:func:`lightning_ext._cpp_build.select_extension`) for a contiguous CPU
    tensor where it builds, else ``None`` (ATen's kernels; set ``LIGHTNING_EXT_SELECT_KERNEL=0`` to force them)."""
    if values.device.type != "cpu" or not values.is_contiguous() or os.environ.get("LIGHTNING_EXT_SELECT_KERNEL") == "0":
        return None
    from lightning_ext._cpp_build import select_extension

    return select_extension()


def topk_masks(tensors: Sequence[torch.Tensor], sparsity: float, scope: str = "global") -> list[torch.Tensor]:
    """Boolean masks keeping the largest magnitudes: ``ceil(n (1 - sparsity))`` over all tensors
    together (``scope="global"``) or per tensor (``"layer"``)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if scope == "layer":
        return [topk_masks([t], sparsity, "global")[0] for t in tensors]
    flat = torch.cat([t.detach().abs().flatten() for t in tensors])
    drop = flat.numel() - math.ceil(flat.numel() * (1.0 - sparsity))
    if drop == 0:
        return [torch.ones_like(t, dtype=torch.bool) for t in tensors]
    threshold = kth_smallest(flat, drop)  # the largest magnitude that is dropped
    return [t.detach().abs() > threshold for t in tensors]


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """N:M mask (``n`` kept of every ``m`` along the input dimension), or ``None`` if it does not tile."""
    if not 0 < n <= m:
        raise ValueError(f"need 0 < n <= m, got n={n}, m={m}")
    if weight.dim() < 2 or weight.numel() % m:
        return None
    w = weight.detach().abs()
    grouped = w.permute(0, *range(2, w.dim()), 1) if w.dim() > 2 else w  # conv: (out, kh, kw, in)
    groups = grouped.reshape(-1, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(1, torch.topk(groups, n, dim=1, sorted=False).indices, True)
    mask = mask.view(grouped.shape)
    return mask.permute(0, w.dim() - 1, *range(1, w.dim() - 1)) if w.dim() > 2 else mask


def prunable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The default prunable set: every trainable tensor with ``ndim > 1`` (weights of Linear/conv/embedding)."""
    return [p for p in model.parameters() if p.requires_grad and p.dim() > 1]


@torch.no_grad()
def one_shot_prune(model: nn.Module, sparsity: float, scope: str = "global",
                   parameters: Iterable[nn.Parameter] | None = None) -> list[torch.Tensor]:
    """Zero the smallest magnitudes in place (no retraining); returns the masks."""
    params = list(parameters) if parameters is not None else prunable_parameters(model)
    masks = topk_masks(params, sparsity, scope)
    for p, mask in zip(params, masks):
        p.mul_(mask)
    return masks


def batchnorm_modules(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def running_stats(modules: Iterable[nn.Module]) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    """A copy of the running statistics (and batch counters) of the normalization layers among ``modules`` that
    track them: what a forward in training mode changes."""
    return [(m, {name: b.detach().clone() for name, b in m.named_buffers(recurse=False) if b is not None})
            for m in modules if m.track_running_stats]


def restore_running_stats(saved: Iterable[tuple[nn.Module, dict[str, torch.Tensor]]]) -> None:
    """Put back what :func:`running_stats` copied."""
    with torch.no_grad():
        for module, buffers in saved:
            for name, value in buffers.items():
                getattr(module, name).copy_(value)


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Iterable[_BatchNorm]) -> Iterator[None]:
    """BatchNorm running statistics (and batch counters) come out of the block exactly as they went in."""
    saved = running_stats(modules)
    try:
        yield
    finally:
        restore_running_stats(saved)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable, forward=None) -> None:
    """Re-estimate BatchNorm statistics after pruning (BNT): reset them, then average them
    cumulatively (momentum ``None``) over ``batches`` in train mode; the model's mode and the
    modules' momenta are restored. ``forward(model, batch)`` defaults to ``model(batch)``."""
    modules = batchnorm_modules(model)
    if not modules:
        return
    was_training, momenta = model.training, [m.momentum for m in modules]
    for m in modules:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        for m, momentum in zip(modules, momenta):
            m.momentum = momentum
        model.train(was_training)
