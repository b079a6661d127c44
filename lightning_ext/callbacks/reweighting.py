"""``LossReweighting``: the loss of each training micro-batch becomes a weighted sum of its per-sample
losses, weights from the losses of the whole global micro-batch (Sow et al., ICLR 2025; the math
and the strategy names are in :mod:`lightning_ext.nn.reweighting`).

Lightning's ``on_before_backward`` cannot replace the loss, so the callback wraps the module's
``training_step`` (:mod:`lightning_ext.callbacks.step_wrapper`: set in ``setup``, removed in ``teardown``). The module must follow the per-sample loss contract
(:mod:`lightning_ext.losses`): ``training_step`` returns ``{"loss": ..., "per_sample_loss": [B]}``.

Per micro-batch: the detached per-sample losses are all-gathered over the data-parallel ranks
(padded when local batch sizes differ), weights are computed in fp32 on every rank alike, each rank
takes its own slice **by global rank** (the fms-fsdp reference slices by local rank, which is wrong
on multi-node jobs) and returns ``loss = W * sum_i w_i l_i``; DDP / DeepSpeed gradient averaging then
gives the globally weighted loss. Lightning's own division by ``accumulate_grad_batches`` still
applies (weights are per micro-batch, as in the paper).

The returned dict keeps ``per_sample_loss`` detached (its graph is not kept alive in ``outputs``)
and adds ``sample_weights`` (this rank's weights) for other callbacks. Logged every step under
``reweight/``: ``weight_entropy``, ``effective_sample_size``, ``weight_max``, ``loss_weight_corr``.

Warm-up: exactly uniform weights for the first ``warmup_steps`` optimizer steps (the GPT-2
reference's "burn-out"); ``warmup_r`` instead uses that temperature (fms-fsdp uses 100). Weights
depend only on the batch and ``trainer.global_step``, so a resume continues identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_ext._checks import check_bool, check_int, check_number, check_str
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.step_wrapper import unwrap_training_step, wrap_training_step
from lightning_ext.losses import require_keys
from lightning_ext.nn.reweighting import resolve_strategy, sample_weights, weight_diagnostics

__all__ = ["LossReweighting"]


class LossReweighting(Technique):
    """Reweight each micro-batch's samples by their loss (Sow et al., ICLR 2025, arXiv 2502.06733).

    Args:
        strategy: ``"linupper"`` (default, the paper's recommendation), ``"quadratic"`` (``"mid"``
            accepted), ``"extremes"`` or ``"uniform"``.
        r: softmax temperature (> 0; the KL regulariser). Larger is closer to uniform.
        delta: half-width of the normalised loss range (> 0).
        warmup_steps: optimizer steps with warm-up weights first (>= 0).
        warmup_r: temperature during warm-up (> 0); ``None`` (default) gives exactly uniform weights.
        log_diagnostics: log the ``reweight/`` metrics every step.
    """

    technique_name = "LossReweighting"

    def __init__(self, strategy: str = "linupper", r: float = 0.4, delta: float = 1.0, warmup_steps: int = 0,
                 warmup_r: float | None = None, log_diagnostics: bool = True) -> None:
        super().__init__()
        check_str("strategy", strategy)
        self.strategy = resolve_strategy(strategy)
        check_number("r", r, 0.0, low_open=True)
        check_number("delta", delta, 0.0, low_open=True)
        check_int("warmup_steps", warmup_steps, 0)
        check_number("warmup_r", warmup_r, 0.0, low_open=True, optional=True)  # None: uniform weights in warmup
        check_bool("log_diagnostics", log_diagnostics)
        self.r, self.delta, self.warmup_steps, self.warmup_r = r, delta, warmup_steps, warmup_r
        self.log_diagnostics = log_diagnostics
        self._wrapped: tuple[pl.LightningModule, Callable] | None = None

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._wrapped is not None:
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError("LossReweighting with manual optimization is not supported: the callback replaces "
                               "the loss that training_step returns, which Lightning back-propagates only under "
                               "automatic optimization. Weight the per-sample losses yourself with "
                               "lightning_ext.nn.reweighting.sample_weights.")
        def wrap(original: Callable) -> Callable:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return self._reweight(trainer, pl_module, original(*args, **kwargs))
            return training_step

        self._wrapped = (pl_module, wrap_training_step(pl_module, wrap))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._wrapped is not None and stage == "fit":
            unwrap_training_step(*self._wrapped)
            self._wrapped = None

    # -- the technique --------------------------------------------------------------------------
    def temperature(self, global_step: int) -> float:
        """The softmax temperature at an optimizer step (``inf``: uniform weights)."""
        if global_step < self.warmup_steps:
            return math.inf if self.warmup_r is None else self.warmup_r
        return self.r

    def _reweight(self, trainer: pl.Trainer, pl_module: pl.LightningModule, output: Any) -> Any:
        output = require_keys(output, ("per_sample_loss",), "LossReweighting")
        per_sample = output["per_sample_loss"]
        if per_sample.dim() != 1:
            raise ValueError(f"per_sample_loss must be a [B] tensor, got shape {tuple(per_sample.shape)}")
        losses, valid, offset = gather_losses(trainer, per_sample.detach().float())
        weights = sample_weights(losses, self.strategy, self.temperature(trainer.global_step), self.delta, valid)
        local = weights[offset:offset + per_sample.numel()]
        loss = trainer.world_size * (local.to(per_sample.dtype) * per_sample).sum()
        if self.log_diagnostics:
            for name, value in weight_diagnostics(weights, losses, valid).items():
                pl_module.log(f"reweight/{name}", value, on_step=True, on_epoch=False, batch_size=1)
        return {**output, "loss": loss, "per_sample_loss": per_sample.detach(), "sample_weights": local.detach()}


def gather_losses(trainer: pl.Trainer, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """All ranks' losses as one flat vector (rank-major), a validity mask when local batch sizes
    differ, and the offset of this rank's slice — by **global** rank."""
    world = trainer.world_size
    if world == 1:
        return local, None, 0
    strategy = trainer.strategy
    sizes = strategy.all_gather(torch.tensor([local.numel()], device=local.device)).view(world)
    widest = int(sizes.max())  # one host sync per step: the padding length
    padded = torch.full((widest,), math.nan, device=local.device)
    padded[: local.numel()] = local
    gathered = strategy.all_gather(padded).view(world * widest)
    valid = (torch.arange(widest, device=local.device) < sizes.view(world, 1)).view(world * widest)
    if bool(valid.all()):
        valid = None
    return gathered, valid, trainer.global_rank * widest
