"""CrAM as a callback: make any LightningModule's optimizer compression-aware.

Wraps what ``configure_optimizers`` returns with :class:`lightning_ext.optimizers.CrAM` (see there
for the algorithm and where it differs from the reference). The prunable tensors are the module's
trainable tensors with ``ndim > 1`` (or those of the modules named in ``layers``); every
BatchNorm of the module is protected during the second pass.

The callback runs CrAM's two passes itself instead of through the optimizer closure, which Lightning
passes only with ``32-true``/``bf16-mixed`` and no accumulation (16-mixed's GradScaler and DeepSpeed call
the closure once and step without it):

* pass 1 is Lightning's own forward/backward of every micro-batch of the step (the strategy reduces the
  gradients; ``training_step``'s arguments are recorded as they go by);
* in ``on_before_optimizer_step`` (every precision plugin calls it after the last micro-batch's backward
  and, under 16-mixed, after unscaling) the optimizer moves to ``C(θ + ρ g)``, and the recorded micro-batches
  are replayed through the strategy — ``trainer.strategy.training_step`` and ``trainer.strategy.backward``,
  the loss divided by ``accumulate_grad_batches`` as Lightning does, gradient sync blocked on all but the
  last micro-batch — so pass 2's gradient is reduced, scaled and accumulated exactly as pass 1's was;
* under 16-mixed, pass 2's gradients are unscaled with the same GradScaler and a non-finite value makes
  the scaler skip the step, as it would for pass 1;
* the optimizer restores ``θ`` and the step proceeds as Lightning would take it.

So CrAM works with ``accumulate_grad_batches > 1`` (all micro-batches of pass 1, then all of pass 2),
``16-mixed``, ``bf16-mixed``, DDP and FSDP2 (``fsdp_cpu``: masks on the local dim-0 shards equal to the
unsharded masks, :mod:`lightning_ext.nn.sharded_masks`). Under DeepSpeed ZeRO-1/2/3 the engine keeps the
reduced gradients in its own partitions, so pass 2 is taken with ``torch.autograd.grad`` outside its hooks at
the engine's accumulation boundary and written into those partitions
(:mod:`lightning_ext.optimizers.cram_deepspeed`). Refused at setup, naming both parts: FSDP1 (flat
parameters), ``bf16-true`` and ``16-true`` (half-precision weights), and manual optimization (no optimizer
step of Lightning's to hook into). Other callbacks' ``training_step`` wrappers run in both passes, as they do with the closure.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_ext._checks import check_names
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.optimizer_diagnostics import log_diagnostics
from lightning_ext.callbacks.optimizer_injection import inject_wrapper
from lightning_ext.callbacks.step_wrapper import unwrap_training_step, wrap_training_step
from lightning_ext.nn.pruning import batchnorm_modules, frozen_batchnorm_stats
from lightning_ext.optimizers import cram_deepspeed
from lightning_ext.optimizers.cram import CRAM_DEFAULTS as _D
from lightning_ext.optimizers.cram import CrAM as CrAMOptimizer
from lightning_ext.optimizers.cram import CrAMHyperparameters
from lightning_ext.strategies.probe import strategy_info
from lightning_ext.surgery import select_modules

SUPPORTED_PRECISION = ("32-true", "64-true", "bf16-mixed", "16-mixed", "32", "64")


class CrAM(Technique):
    """Compression-Aware Minimizer (ICLR 2023) around the module's own optimizer.

    Args:
        rho: perturbation radius (>= 0).
        sparsities: top-k sparsities drawn per step, each in [0, 1).
        compression: ``"topk"`` or ``"nm"`` (N:M patterns ``nm_patterns``).
        scope: top-k ``"global"`` or per ``"layer"``.
        nm_patterns: (N, M) pairs drawn per step for ``compression="nm"``.
        plus: CrAM+ (add the clean gradient).
        sparse_grad: mask the second pass's gradient.
        grad_norm: normalise the perturbation by the gradient norm.
        layers: module names whose weights are prunable (peft-style suffix match); default: all ndim > 1 tensors.
        seed: seed of the per-step sparsity draw.
    """

    def __init__(self, rho: float = _D.rho, sparsities: list[float] | None = None, compression: str = _D.compression,
                 scope: str = _D.scope, nm_patterns: list[list[int]] | None = None, plus: bool = _D.plus,
                 sparse_grad: bool = _D.sparse_grad, grad_norm: bool = _D.grad_norm, layers: list[str] | None = None,
                 seed: int = _D.seed) -> None:
        super().__init__()
        hp = CrAMHyperparameters(rho, _D.sparsities if sparsities is None else sparsities, compression, scope,
                                 _D.nm_patterns if nm_patterns is None else nm_patterns, plus, sparse_grad, grad_norm,
                                 seed)
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of module names, or None for every matrix; got {layers!r}")
        check_names("layers", layers, optional=True)
        self.kwargs = dataclasses.asdict(hp)
        self.kwargs["sparsities"], self.kwargs["nm_patterns"] = list(hp.sparsities), list(hp.nm_patterns)
        self.layers = layers
        self.optimizers: list[CrAMOptimizer] = []

    def _refuse_unsupported(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            raise RuntimeError("CrAM with FSDP1 (FSDPStrategy) is not supported: it hands the optimizer flat "
                               "parameters, whose rows and N:M groups are lost. Use fsdp_cpu or "
                               "ModelParallelStrategy (FSDP2, dim-0 shards).")
        precision = str(trainer.precision)
        if precision not in SUPPORTED_PRECISION:
            raise RuntimeError(f"CrAM with precision={precision!r} is not supported: it perturbs and restores the "
                               "weights and needs them in fp32; use '32-true', 'bf16-mixed' or '16-mixed'.")
        if not pl_module.automatic_optimization:
            raise RuntimeError("CrAM with manual optimization is not supported: it runs its second pass in "
                               "on_before_optimizer_step of Lightning's automatic optimization.")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._refuse_unsupported(trainer, pl_module)
        layers = None if self.layers is None else select_modules(pl_module, self.layers, what="CrAM layers")

        def prunable() -> list:  # read when the optimizers are configured (after any sharding of the module)
            if layers is not None:
                return [m.weight for _, m in layers]
            return [p for p in pl_module.parameters() if p.requires_grad and p.dim() > 1]

        self._batchnorm = batchnorm_modules(pl_module)

        def make(opt, mine):
            wrapped = CrAMOptimizer(opt, prunable=mine, batchnorm=self._batchnorm, **self.kwargs)
            wrapped.driven = True
            return wrapped

        self.optimizers = []
        inject_wrapper(pl_module, prunable, make, lambda wrapped: self.optimizers.append(wrapped), self)
        self._micro_batches: list[tuple[tuple, dict]] = []
        self._replaying = False

        def wrap(step):
            def training_step(*args: Any, **kwargs: Any) -> Any:
                if not self._replaying:
                    self._micro_batches.append((args, kwargs))
                return step(*args, **kwargs)
            return training_step

        self._wrapped = (pl_module, wrap_training_step(pl_module, wrap))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if getattr(self, "_wrapped", None) is not None:
            unwrap_training_step(*self._wrapped)
            self._wrapped = None
        self._micro_batches = []

    def _cram_of(self, optimizer: Any) -> CrAMOptimizer | None:
        """The CrAM wrapper that ``optimizer`` is or wraps (another wrapper, e.g. LAWN, may be around it; under
        DeepSpeed the engine's ZeRO optimizer holds it as ``.optimizer``)."""
        seen, hops = optimizer, 0
        while seen is not None and hops < 8:
            if any(seen is o for o in self.optimizers):
                return seen
            seen, hops = getattr(seen, "base", None) or getattr(seen, "optimizer", None), hops + 1
        return None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        cram = self._cram_of(optimizer)
        if cram is None:
            self._micro_batches = []
            return
        if strategy_info(trainer).is_deepspeed:
            # Lightning steps the engine after every micro-batch; the engine steps at its accumulation boundary
            if not trainer.strategy.model.is_gradient_accumulation_boundary():
                return
            batches, self._micro_batches = self._micro_batches, []
            self._second_pass_deepspeed(trainer, pl_module, optimizer, cram, batches)
            return
        batches, self._micro_batches = self._micro_batches, []
        if not batches:
            raise RuntimeError("CrAM: no training_step was recorded for this optimizer step")
        cram.perturb()
        try:
            optimizer.zero_grad(set_to_none=True)
            self._replay(trainer, optimizer, batches)
            _unscale_second_pass(trainer, optimizer, cram)
        finally:
            cram.restore()

    def _second_pass_deepspeed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, zero: Any,
                               cram: CrAMOptimizer, batches: list[tuple[tuple, dict]]) -> None:
        """:func:`lightning_ext.optimizers.cram_deepspeed.second_pass`, pass 2 being the step's micro-batches
        through the module with ``torch.autograd.grad``."""
        cram_deepspeed.second_pass(
            cram, zero, lambda params, grads: self._autograd_pass_two(trainer, pl_module, params, grads, batches))

    def _autograd_pass_two(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: list,
                           grads: list[torch.Tensor], batches: list[tuple[tuple, dict]]) -> None:
        """Pass 2's local gradient, summed into ``grads``: the step's micro-batches through the module, the
        gradients taken with ``torch.autograd.grad`` (nothing accumulates into ``.grad``, so the engine's
        gradient hooks do not fire). Pass 1's loss went through Lightning's division by
        ``accumulate_grad_batches`` and — under Lightning's own DeepSpeed strategy, not ``deepspeed_cpu`` — the
        engine's by its ``gradient_accumulation_steps``: so does this one."""
        scale = 1.0 / trainer.accumulate_grad_batches
        if getattr(trainer.strategy, "engine_scales_loss", True):
            scale /= trainer.strategy.model.gradient_accumulation_steps()
        with self._second_pass():
            for args, kwargs in batches:
                with trainer.precision_plugin.train_step_context(), torch.enable_grad():
                    loss = _loss_of(pl_module.training_step(*args, **kwargs))
                    if loss is None:
                        continue
                    step = torch.autograd.grad(loss * scale, params, allow_unused=True)
                for view, grad in zip(grads, step):
                    if grad is not None:
                        view.add_(grad.reshape(view.shape))

    @contextlib.contextmanager
    def _second_pass(self):
        """While pass 2 replays: ``training_step`` calls are not recorded, BatchNorm statistics are frozen."""
        self._replaying = True
        try:
            with frozen_batchnorm_stats(self._batchnorm):
                yield
        finally:
            self._replaying = False

    def _replay(self, trainer: pl.Trainer, optimizer: Any, batches: list[tuple[tuple, dict]]) -> None:
        """Pass 2: the step's micro-batches again, through the strategy (its wrapped model, loss scaling and
        gradient reduction), BatchNorm statistics frozen."""
        strategy = trainer.strategy
        block = getattr(strategy, "block_backward_sync", None)
        with self._second_pass():
            for i, (args, kwargs) in enumerate(batches):
                last = i == len(batches) - 1
                with contextlib.nullcontext() if last or block is None else block(), torch.enable_grad():
                    loss = _loss_of(strategy.training_step(*args, **kwargs))
                    if loss is not None:
                        strategy.backward(loss / trainer.accumulate_grad_batches, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        log_diagnostics(pl_module, self.optimizers)


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss Lightning would backpropagate from a ``training_step`` output (a tensor, a dict's ``loss``, or
    ``None`` to skip)."""
    if isinstance(output, dict):
        return output.get("loss")
    return output


def _unscale_second_pass(trainer: pl.Trainer, optimizer: Any, cram: CrAMOptimizer) -> None:
    """Under 16-mixed, pass 2's backward ran on the GradScaler's scaled loss: divide its gradients by the scale
    (the scaler's own kernel) and record a non-finite value with the scaler, which then skips the step as it
    does when pass 1 overflows. The scaler keeps one ``found_inf`` per device per optimizer after
    ``unscale_``; the value found here is added to it."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return
    grads = [p.grad for g in cram.param_groups for p in g["params"] if p.grad is not None]
    if not grads:
        return
    found_inf = torch.zeros(1, device=grads[0].device)
    inv = torch.full((1,), 1.0 / float(scaler.get_scale()), device=grads[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv)
    state = scaler._per_optimizer_states[id(optimizer)]  # noqa: SLF001 - see the docstring
    found = state.get("found_inf_per_device")
    if not found:
        raise RuntimeError("CrAM under 16-mixed: the GradScaler did not unscale pass 1 before "
                           "on_before_optimizer_step; cannot account for pass 2's overflow")
    device = next(iter(found))
    found[device] += found_inf.to(found[device].device).reshape(found[device].shape)
