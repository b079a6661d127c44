r"""CrAM: "A Compression-Aware Minimizer" (Peste, Vladu, Kurtic, Lampert, Alistarh; ICLR 2023,
arXiv 2207.14200) as a wrapper around any optimizer.

CrAM trains a dense model that stays accurate after one-shot compression. Each step takes two
forward/backward passes on the same batch (so it needs the closure):

.. code-block:: text

    g   = grad L(θ)                                  pass 1
    θ'  = θ + ρ g          (grad_norm: ρ g / |g|)    all parameters with gradients
    k   ~ sparsities (one draw per step, seeded by seed + step: identical on every rank)
    θ~  = C_k(θ')          top-k by magnitude (global or per layer) or N:M, on the prunable tensors
    g~  = grad L(θ~)                                 pass 2, BatchNorm running statistics untouched
    sparse_grad: g~ <- M ⊙ g~ ;   restore θ (copy, storage kept)
    base step with g~ (CrAM) or g~ + g (CrAM+, ``plus=True``)

Defaults are the reference's ``TopkCrAM``: ρ = 0.05, sparsities (0.5, 0.7, 0.9), ``plus=True``,
``sparse_grad=True``, ``grad_norm=False``, global top-k. N:M (``compression="nm"``) draws one of
``nm_patterns`` per step (the reference: 2:4 or 4:8 with equal probability).

Where we differ from the reference code (``IST-DASLab/CrAM`` b89d9ff), on purpose:

* ``θ`` is restored from a kept copy, never by subtracting the perturbation. A parameter that owns its
  storage keeps it untouched: ``θ + ρ g`` goes into a kept buffer that the parameter points at for pass 2
  only, so nothing is copied (the reference rebinds ``p.data`` to fresh tensors every step). Views of flat
  buffers (DeepSpeed, FSDP) and DTensors are copied into kept buffers and back, their storage kept;
* masks are boolean and freed after the step; the perturbed weights, and the copies a view needs, live
  in buffers reused every step (allocated once: fresh parameter-sized tensors page-fault on CPU), outside the
  state dict — the state dict is the base optimizer's, and loading it restores the base's momentum
  (the reference loses SGD's momentum on resume);
* the sparsity draw is seeded by the step counter so every DDP rank compresses alike (the
  reference samples from NumPy's global RNG, which diverges across processes);
* top-k keeps exactly ceil(n (1 - k)) weights (the reference's percentile keeps one fewer);
* BatchNorm statistics are restored after pass 2 for every ``_BatchNorm`` subclass (the
  reference sets momentum 0 on ``BatchNorm2d`` only).

Only the closure path is supported: Lightning passes the closure under fp32 and bf16-mixed with
automatic optimization and ``accumulate_grad_batches=1``; ``lightning_ext.callbacks.CrAM`` refuses
the other combinations at setup. The loss Lightning records for the step is pass 2's (the last
closure call); ``step`` returns pass 1's.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_ext._checks import check_bool, check_choice, check_int, check_number
from lightning_ext.nn.pruning import batchnorm_modules, frozen_batchnorm_stats, kth_smallest, nm_mask, topk_masks
from lightning_ext.nn.sharded_masks import Collectives, sharded_nm_masks, sharded_topk_masks
from lightning_ext.optimizers import _sharding
from lightning_ext.optimizers._wrapper import WrapperOptimizer, evaluate_closure

__all__ = ["CRAM_DEFAULTS", "CrAM", "CrAMHyperparameters"]

COMPRESSIONS = ("topk", "nm")
SCOPES = ("global", "layer")


@dataclass(frozen=True)
class CrAMHyperparameters:
    """CrAM's hyper-parameters and their validation, written once: the optimizer (:class:`CrAM`), its
    LightningCLI form (:class:`lightning_ext.optimizers.cli.CrAM`) and the callback
    (:class:`lightning_ext.callbacks.CrAM`) take their defaults from :data:`CRAM_DEFAULTS` and validate by
    building one. Sequences are stored as tuples."""

    rho: float = 0.05
    sparsities: tuple[float, ...] = (0.5, 0.7, 0.9)
    compression: str = "topk"
    scope: str = "global"
    nm_patterns: tuple[tuple[int, int], ...] = ((2, 4), (4, 8))
    plus: bool = True
    sparse_grad: bool = True
    grad_norm: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_number("rho", self.rho, 0.0)
        sparsities = _as_tuple(self.sparsities, "sparsities")
        if not sparsities or any(not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0
                                 for v in sparsities):
            raise ValueError(f"sparsities must be a non-empty list of values in [0, 1), got {list(sparsities)}")
        check_choice("compression", self.compression, COMPRESSIONS)
        check_choice("scope", self.scope, SCOPES)
        patterns = tuple(_as_tuple(p, "nm_patterns") for p in _as_tuple(self.nm_patterns, "nm_patterns"))
        if not patterns or any(len(p) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in p)
                               or not 0 < p[0] <= p[1] for p in patterns):
            raise ValueError(f"nm_patterns must be (N, M) integer pairs with 0 < N <= M, got {list(patterns)}")
        for name in ("plus", "sparse_grad", "grad_norm"):
            check_bool(name, getattr(self, name))
        check_int("seed", self.seed, 0)
        object.__setattr__(self, "sparsities", tuple(float(v) for v in sparsities))
        object.__setattr__(self, "nm_patterns", patterns)


@dataclasses.dataclass(frozen=True)
class LocalShards:
    """This rank's flat pieces of the prunable tensors (in their order, possibly empty), their full sizes, and
    the collectives of the group they are cut over."""

    local: list[torch.Tensor]
    full_numels: list[int]
    comm: Collectives
    #: (n, m) -> the N:M masks of the local pieces (the caller gathers what groups cut by a boundary need)
    nm_masks: Callable[[int, int], list[torch.Tensor | None]]


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops write the DTensor), else the tensor itself."""
    return t.to_local() if _is_dtensor(t) else t


def _owns_storage(t: torch.Tensor) -> bool:
    """A plain tensor that is all of its storage (DeepSpeed's and FSDP's parameters share flat buffers, DDP's
    bucket-view gradients its buckets, whether or not autograd sees them as views; DTensors are excluded)."""
    return (not _is_dtensor(t) and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def _copy_all(targets: list[torch.Tensor], sources: list[torch.Tensor]) -> None:
    if targets:  # the foreach kernels refuse empty lists
        torch._foreach_copy_(targets, sources)


def _called_by(function: str, depth: int = 4) -> bool:
    """Whether one of the ``depth`` nearest callers of ``step`` is a function of that name."""
    frame = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _as_tuple(value: object, name: str) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return tuple(value)


CRAM_DEFAULTS = CrAMHyperparameters()
_D = CRAM_DEFAULTS


class CrAM(WrapperOptimizer):
    """Compression-aware minimizer around ``optimizer`` (see the module docstring).

    Args:
        optimizer: the base optimizer (SGD with momentum in every reference configuration).
        model: convenience: take ``prunable`` (tensors with ndim > 1) and ``batchnorm`` from it.
        prunable: tensors the compression acts on (default: the model's, else every param with ndim > 1).
        batchnorm: BatchNorm modules whose running statistics pass 2 must not change.
        rho: perturbation radius (>= 0).
        sparsities: top-k sparsities to draw from, each in [0, 1) ("CrAM-Multi" with several).
        compression: ``"topk"`` or ``"nm"``.
        scope: top-k over all prunable tensors together (``"global"``) or per tensor (``"layer"``).
        nm_patterns: (N, M) patterns to draw from for ``compression="nm"``.
        plus: CrAM+ (add the clean gradient).
        sparse_grad: mask the pass-2 gradient (chain rule through the mask); else straight-through.
        grad_norm: normalise the perturbation by the global gradient norm (SAM-style).
        seed: seed of the per-step sparsity draw.
    """

    def __init__(self, optimizer: Optimizer, model: nn.Module | None = None,
                 prunable: Iterable[torch.Tensor] | None = None, batchnorm: Iterable[nn.Module] | None = None,
                 rho: float = _D.rho, sparsities: Sequence[float] = _D.sparsities, compression: str = _D.compression,
                 scope: str = _D.scope, nm_patterns: Sequence[tuple[int, int]] = _D.nm_patterns,
                 plus: bool = _D.plus, sparse_grad: bool = _D.sparse_grad, grad_norm: bool = _D.grad_norm,
                 seed: int = _D.seed) -> None:
        hp = CrAMHyperparameters(rho, sparsities, compression, scope, nm_patterns, plus, sparse_grad, grad_norm, seed)
        super().__init__(optimizer)
        owned = [p for g in self.param_groups for p in g["params"]]
        if prunable is None:
            prunable = (p for p in model.parameters() if p.dim() > 1) if model is not None else (
                p for p in owned if p.dim() > 1)
        self.prunable = list(prunable)
        known = {id(p) for p in owned}
        if any(id(p) not in known for p in self.prunable):
            raise ValueError("prunable: some tensors are not parameters of the wrapped optimizer")
        if batchnorm is None:
            batchnorm = batchnorm_modules(model) if model is not None else []
        self.batchnorm = list(batchnorm)
        self.hyperparameters = hp
        self.rho, self.sparsities, self.compression, self.scope = hp.rho, list(hp.sparsities), hp.compression, hp.scope
        self.nm_patterns = list(hp.nm_patterns)
        self.plus, self.sparse_grad, self.grad_norm, self.seed = hp.plus, hp.sparse_grad, hp.grad_norm, hp.seed
        self.last_sparsity: float | tuple[int, int] | None = None
        self._steps = 0
        self.set_group_counter("cram_step", 0)
        #: set by lightning_ext.callbacks.CrAM, which runs pass 2 itself (perturb, replay, restore) before step()
        self.driven = False
        self._pending: tuple | None = None
        self._second_pass_done = False
        #: this rank's flat pieces of the prunable tensors where neither they nor DTensors say it (DeepSpeed
        #: ZeRO-3's partitions), set by lightning_ext.optimizers.cram_deepspeed for the step
        self.local_shards: LocalShards | None = None
        self._buffers: dict[str, list[torch.Tensor]] = {}

    def _draw(self) -> float | tuple[int, int]:
        rng = random.Random(self.seed * 1_000_003 + self._steps)  # identical on every rank
        return rng.choice(self.nm_patterns if self.compression == "nm" else self.sparsities)

    def _collectives(self) -> Collectives | None:
        """The process group the prunable tensors are sharded over (FSDP2's dim-0 DTensors, ZeRO-3's partitions),
        else ``None``: unsharded or replicated (DDP, ZeRO-1/2) tensors need no collective, every rank computes the
        same masks."""
        if self.local_shards is not None:
            return self.local_shards.comm
        sharded = [p for p in self.prunable if _is_dtensor(p)]
        if not sharded:
            return None
        if len(sharded) != len(self.prunable):
            raise RuntimeError("CrAM: some prunable tensors are DTensors and some are not; shard all of them "
                               "(fsdp_cpu shards every parameter-holding module by default)")
        group = sharded[0].device_mesh.get_group()
        plain = Collectives.of_group(group)  # the sums go through _sharding.all_reduce (counted in tests)
        return dataclasses.replace(plain, all_reduce=lambda t: _sharding.all_reduce(t, group))

    def masks(self, level: float | tuple[int, int]) -> list[torch.Tensor | None]:
        """Masks of the prunable tensors at a sparsity (top-k) or an (N, M) pattern; for FSDP2's DTensors, the
        masks of this rank's local shards, equal to the slices of the unsharded masks
        (:mod:`lightning_ext.nn.sharded_masks`). Boolean, except the unsharded global top-k's, which are 0/1 in
        the tensors' dtype (:meth:`_global_topk_masks`); ``None`` for a tensor N:M leaves dense."""
        if self.local_shards is not None:
            shards = self.local_shards
            if self.compression == "nm":  # groups of M may be cut by a flat partition boundary
                return shards.nm_masks(*level)
            return sharded_topk_masks(shards.local, shards.full_numels, level, self.scope, shards.comm)
        comm = self._collectives()
        if comm is not None:
            local = [_local(p) for p in self.prunable]
            if self.compression == "nm":
                return sharded_nm_masks(local, [p.shape for p in self.prunable], *level, comm)
            return sharded_topk_masks(local, [p.numel() for p in self.prunable], level, self.scope, comm)
        if self.compression == "nm":
            return [nm_mask(p, *level) for p in self.prunable]
        if self.scope == "global" and self.prunable:
            return self._global_topk_masks(level)
        return list(topk_masks(self.prunable, level, self.scope))

    def _global_topk_masks(self, sparsity: float) -> list[torch.Tensor]:
        """:func:`lightning_ext.nn.pruning.topk_masks` (global scope) into buffers kept across steps: the
        magnitudes are gathered into one flat buffer, thresholded once, and the masks compared from its slices —
        no fresh model-sized tensors (on CPU their page faults cost more than the arithmetic). The masks are 0/1
        in the tensors' dtype, not bool: on CPU a comparison into a float and a multiply by it are 3-5x faster
        than into and by a bool, and multiplying by 1.0 or 0.0 gives the same bits as by True or False."""
        tensors = [p.detach() for p in self.prunable]
        first = tensors[0]
        (flat,) = self._kept_as("magnitudes", [(torch.Size([sum(t.numel() for t in tensors)]), first.dtype,
                                                first.device)])
        masks = self._kept_as("masks", [(t.shape, t.dtype, t.device) for t in tensors])
        torch.cat([t.reshape(-1) for t in tensors], out=flat)
        flat.abs_()
        drop = flat.numel() - math.ceil(flat.numel() * (1.0 - sparsity))
        if drop == 0:
            return [m.fill_(1) for m in masks]
        # for ATen's comparisons where the C++ bracket kernel is not used (untouched, so not resident, otherwise)
        workspace = self._kept_as("selection", [(flat.shape, torch.bool, flat.device)] * 2)
        threshold = kth_smallest(flat, drop, workspace=(workspace[0], workspace[1]))
        at = 0
        for t, mask in zip(tensors, masks):
            torch.gt(flat[at:at + t.numel()].view_as(t), threshold, out=mask)
            at += t.numel()
        return masks

    def diagnostics(self) -> dict[str, float]:
        """What a logger records each step: the sparsity drawn for the last step's perturbation
        (``cram/sparsity``), or ``cram/nm_n_over_m`` for N:M compression; empty before the first step."""
        level = self.last_sparsity
        if level is None:
            return {}
        return {"cram/sparsity": level} if isinstance(level, float) else {"cram/nm_n_over_m": level[0] / level[1]}

    @torch.no_grad()
    def perturb(self, params: list[torch.Tensor] | None = None, grads: list[torch.Tensor] | None = None) -> None:
        """First half of a step, with pass 1's gradients ``g``: keep ``θ`` (and ``g`` for CrAM+), move the
        parameters to ``C_k(θ + ρ g)``. The caller then computes pass 2's gradients (BatchNorm statistics
        frozen) and calls :meth:`restore`. By default the parameters are the param groups' and ``g`` their
        ``.grad`` (for DTensors, this rank's local shards); under DeepSpeed the caller passes the model's
        parameters and their full gradients (:mod:`lightning_ext.optimizers.cram_deepspeed`).

        A parameter that owns its storage (not a view of a flat buffer, not a DTensor) is not copied: ``θ + ρ g``
        is written into a buffer kept across steps, the parameter is pointed at it for pass 2 and back at its
        own, untouched storage by :meth:`restore`; its pass-1 gradient is kept as the clean gradient and
        detached from it, so pass 2's backward starts a new one. Views (DeepSpeed's, FSDP's flat parameters,
        DDP's bucket-view gradients) are copied into kept buffers and back."""
        if self._pending is not None:
            raise RuntimeError("CrAM.perturb: the previous perturbation was not restored")
        explicit = params is not None
        if not explicit:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            grads = [p.grad for p in params]
        local, grads = [_local(p) for p in params], [_local(g) for g in grads]
        own = [not explicit and _owns_storage(p) for p in params]
        clean = self._clean_gradients(params, grads, own) if self.plus else None
        copied = [t for t, o in zip(local, own) if not o]
        backup = self._kept("backup", copied)
        _copy_all(backup, copied)
        scale = self.rho
        if self.rho > 0 and self.grad_norm:
            squares = torch.stack([torch.linalg.vector_norm(g) ** 2 for g in grads]).sum() if grads \
                else torch.zeros(())
            comm = self._collectives()
            if comm is not None:
                comm.all_reduce(squares)
            scale = self.rho / (squares.sqrt() + 1e-12)
        moved = self._perturbed_buffers([t for t, o in zip(local, own) if o])
        originals, at_moved, at_copied = [], 0, 0
        for p, t, g, o in zip(params, local, grads, own):
            if o:  # θ + ρ g into the kept buffer, the parameter pointed at it
                target = moved[at_moved]
                at_moved += 1
                if isinstance(scale, torch.Tensor):  # grad_norm: a device scalar, no host sync
                    torch.mul(g, scale, out=target).add_(t)
                elif scale:
                    torch.add(t, g, alpha=scale, out=target)
                else:
                    target.copy_(t)
                originals.append(p.data)
                p.data = target
            else:
                originals.append(backup[at_copied])
                at_copied += 1
                if isinstance(scale, torch.Tensor):
                    t.add_(g * scale)
                elif scale:
                    t.add_(g, alpha=scale)
        level = self._draw()
        self.last_sparsity = level
        masks = self.masks(level)
        for target, mask in zip(self._mask_targets(), masks):
            if mask is not None:
                target.mul_(mask)
        self._pending = (params, originals, own, clean, masks)

    def _clean_gradients(self, params: list[torch.Tensor], grads: list[torch.Tensor],
                         own: list[bool]) -> list[torch.Tensor]:
        """Pass 1's gradients for CrAM+: taken from a parameter that owns its storage (pass 2's backward then
        allocates a new one), copied into kept buffers otherwise."""
        taken = [o and _owns_storage(g) for g, o in zip(grads, own)]
        copied = [g for g, t in zip(grads, taken) if not t]
        kept = self._kept("clean", copied)
        _copy_all(kept, copied)
        kept = iter(kept)
        clean = []
        for p, g, t in zip(params, grads, taken):
            if t:
                clean.append(g)
                p.grad = None
            else:
                clean.append(next(kept))
        return clean

    def _perturbed_buffers(self, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Buffers laid out as ``like`` (strides kept, e.g. channels-last), allocated once and reused."""
        kept = self._buffers.get("perturbed")
        if kept is None or [(k.shape, k.stride(), k.dtype, k.device) for k in kept] != [
                (t.shape, t.stride(), t.dtype, t.device) for t in like]:
            kept = self._buffers["perturbed"] = [torch.empty_like(t) for t in like]
        return kept

    def _kept(self, key: str, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Buffers shaped like ``like``, allocated on first use and reused every step: on CPU a fresh
        parameter-sized tensor costs page faults on every step (backup and clean gradient: 2 copies of the
        model, which the step needs at its peak anyway)."""
        return self._kept_as(key, [(t.shape, t.dtype, t.device) for t in like])

    def _kept_as(self, key: str, specs: list[tuple[torch.Size, torch.dtype, torch.device]]) -> list[torch.Tensor]:
        kept = self._buffers.get(key)
        if kept is None or [(k.shape, k.dtype, k.device) for k in kept] != specs:
            kept = self._buffers[key] = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in specs]
        return kept

    def _mask_targets(self) -> list[torch.Tensor]:
        """What the masks apply to: each prunable tensor's local piece (also the key of its gradient in
        :meth:`restore` when the caller passes pieces)."""
        if self.local_shards is not None:
            return list(self.local_shards.local)
        return [_local(p) for p in self.prunable]

    @torch.no_grad()
    def restore(self, grads: list[torch.Tensor] | None = None) -> None:
        """Second half, with pass 2's gradients ``g~`` (``.grad`` of the perturbed parameters, or ``grads`` in
        their order): mask them (``sparse_grad``), put ``θ`` back (a copy into the same storage, never a
        subtraction) and add ``g`` (CrAM+). ``grads`` are then the step's gradients."""
        if self._pending is None:
            raise RuntimeError("CrAM.restore without CrAM.perturb")
        params, originals, own, clean, masks = self._pending
        self._pending = None
        if grads is None:
            if self.plus:  # pass 2 left a tensor without gradient: its step is pass 1's alone
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
        grad_of = {id(p): g for p, g in zip(params, grads) if g is not None}
        keys = self.local_shards.local if self.local_shards is not None else self.prunable
        if self.sparse_grad:
            for key, mask in zip(keys, masks):
                if mask is not None and id(key) in grad_of:
                    _local(grad_of[id(key)]).mul_(mask)
        copied = []
        for p, original, o in zip(params, originals, own):
            if o:
                p.data = original  # its own storage, untouched by the perturbation
            else:
                copied.append(_local(p))
        _copy_all(copied, [t for t, o in zip(originals, own) if not o])
        if self.plus:
            torch._foreach_add_([_local(g) for g in grads], clean)
        self._second_pass_done = True

    @torch.no_grad()
    def step(self, closure=None):
        if self.driven:  # the two passes are run by lightning_ext.callbacks.CrAM (pass 2 before this step)
            loss = evaluate_closure(closure)
            with self.groups_stepped() as call:  # DeepSpeed ZeRO-1/2: one call per param group
                if not self._second_pass_done and _called_by("_init_optim_state"):
                    # torch.distributed.checkpoint creates the base's state before loading a sharded checkpoint
                    # by a step with zero gradients and lr 0 (FSDP2 resume): the base's, not a CrAM step
                    self.base.step()
                    return loss
                if not self._second_pass_done:
                    raise RuntimeError(
                        "CrAM: step() without a second pass. The optimizer is driven by lightning_ext.callbacks."
                        "CrAM, which runs pass 2 in on_before_optimizer_step; that hook did not run for this step "
                        "(manual optimization, or a loop that steps the optimizer directly).")
                self.base.step()
                if call.last:
                    self._second_pass_done = False
                    self._count_step()
            return loss
        if closure is None:
            raise RuntimeError(
                "CrAM needs the closure: it evaluates the loss twice per step. Lightning passes one under "
                "precision 32/bf16-mixed with automatic optimization; use lightning_ext.callbacks.CrAM, which "
                "runs both passes itself under every precision, accumulation and strategy it supports.")
        with torch.enable_grad():
            loss = closure()  # pass 1
        self.perturb()
        with torch.enable_grad(), frozen_batchnorm_stats(self.batchnorm):
            closure()  # pass 2: the closure must zero the gradients before its backward, as Lightning's does
        self.restore()
        self._second_pass_done = False
        self.base.step()
        self._count_step()
        return loss

    def _count_step(self) -> None:
        self._steps += 1
        self.set_group_counter("cram_step", self._steps)

    def discard_step(self) -> None:
        """The step prepared by the driving callback is not taken (lightning_ext.callbacks.NonFiniteGuard skipped
        it): forget its second pass; the step counter, and so the next sparsity draw, stay where they were."""
        self._second_pass_done = False

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._steps = int(self.param_groups[0].get("cram_step", 0))
