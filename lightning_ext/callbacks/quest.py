"""``QuEST``: quantization-aware training of weights and activations (1–8 bits) as a Lightning callback.

The math is in :mod:`lightning_ext.nn.quest`. In ``setup`` the selected ``nn.Linear`` layers become
:class:`~lightning_ext.nn.quest.QuestLinear` (same ``Parameter`` objects, so the optimizer, the checkpoint
keys and DeepSpeed see the plain model; QuEST is stateless). ``start_step`` delays quantization: layers run
in full precision while ``trainer.global_step < start_step`` — the switch is derived from the global step,
which every checkpoint restores, so a resume lands on the same side. Every ``log_every`` steps the layers
record, and the callback logs, ``quest/trust_fraction`` (share of entries whose gradient passes the trust
mask, averaged over quantized operands) and ``quest/<layer>/{weight,input}_rel_mse``. ``convert`` (or
``convert_on_fit_end=True``) turns the layers into their integer export form.

YAML::

    trainer:
      callbacks:
        - class_path: lightning_ext.callbacks.QuEST
          init_args: {bits: 4, exclude: [lm_head]}
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ext._checks import check_bool, check_int, check_names
from lightning_ext.callbacks.base import Technique
from lightning_ext.nn.quest import (
    DEFAULT_EXCLUDE,
    QuestInt,
    QuestLinear,
    _check_bits,
    apply_quest,
    check_layer_args,
    convert_quest,
)

__all__ = ["QuEST"]


class QuEST(Technique):
    """QuEST (Panferov et al., ICML 2025): Hadamard + Gaussian-optimal scale + trust-gradient QAT.

    Args:
        bits: bit-width of weights and activations (1–8; the paper's WbAb).
        weight_bits / act_bits: override either; ``act_bits=16`` (or ``None`` with ``weight_only``) keeps
            activations in full precision.
        trust_scale: multiplier of the trust threshold ``Δ/2`` (``None``: plain straight-through estimator).
        block: Hadamard block (power of two dividing every target's ``in_features``; the paper uses 128).
        targets: name patterns of the layers to quantize (peft's rules); default every ``nn.Linear``.
        exclude: names kept in full precision (default: output heads ``lm_head``/``head``/``classifier``/``output``).
        start_step: quantize from this global step on (0 = from the start).
        log_every: diagnostics period in steps (0 = never).
        hadamard / scale: ablations (rotation off; ``"absmax"`` max scaling instead of ``"gaussian"``).
        convert_on_fit_end: replace the layers by their integer form after training.
        fused: the one-pass C++ CPU kernels (:mod:`lightning_ext.nn.quest_fused`): ``None`` (default) where they
            run, else the eager path with one log line; ``True`` always (an error where they cannot run);
            ``False`` the eager reference.
    """

    def __init__(self, bits: int = 4, weight_bits: int | None = None, act_bits: int | None = None,
                 trust_scale: float | None = 1.0, block: int = 128, targets: str | list[str] | None = None,
                 exclude: str | list[str] | None = list(DEFAULT_EXCLUDE), start_step: int = 0, log_every: int = 50,
                 hadamard: bool = True, scale: str = "gaussian", convert_on_fit_end: bool = False,
                 fused: bool | None = None) -> None:
        super().__init__()
        _check_bits(bits, "bits")
        weight_bits = bits if weight_bits is None else weight_bits
        not_quantized = type(act_bits) is int and act_bits == 16
        act_bits = bits if act_bits is None else (None if not_quantized else act_bits)
        _check_bits(weight_bits, "weight_bits")
        _check_bits(act_bits, "act_bits", allow_none=True, also=" or 16 (activations not quantized)")
        check_layer_args(weight_bits, act_bits, trust_scale, block, hadamard, scale, fused)
        check_names("targets", targets, optional=True)
        check_names("exclude", exclude, optional=True, allow_empty=True)
        check_int("start_step", start_step, 0)
        check_int("log_every", log_every, 0)
        check_bool("convert_on_fit_end", convert_on_fit_end)
        self.layer_args = dict(weight_bits=weight_bits, act_bits=act_bits, trust_scale=trust_scale, block=block,
                               hadamard=hadamard, scale=scale, fused=fused)
        self.targets, self.exclude = targets, exclude
        self.start_step, self.log_every, self.convert_on_fit_end = start_step, log_every, convert_on_fit_end
        self.layers: dict[str, QuestLinear] = {}

    # -- surgery ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> dict[str, QuestLinear]:
        """Swap the target layers (all or nothing, idempotent); usable without a Trainer."""
        self.layers = apply_quest(model, self.targets, self.exclude, **self.layer_args)
        return self.layers

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.prepare(pl_module)
        self._set_enabled(trainer.global_step)

    def _set_enabled(self, step: int) -> None:
        for layer in self.layers.values():
            layer.quest_enabled = step >= self.start_step

    # -- training --------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._set_enabled(trainer.global_step)
        step = trainer.global_step
        collect = self.log_every > 0 and step % self.log_every == 0 and step >= self.start_step
        for layer in self.layers.values():
            layer.collect_stats = collect

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._set_enabled(trainer.global_step)
        for layer in self.layers.values():
            layer.collect_stats = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        fractions, metrics = [], {}
        for name, layer in self.layers.items():
            if not layer.collect_stats:
                continue
            layer.collect_stats = False
            for operand, stats in layer.last_stats.items():
                if stats:
                    fractions.append(stats["trust_fraction"])
                    metrics[f"quest/{name}/{operand}_rel_mse"] = stats["rel_mse"]
            layer.last_stats = {}
        if fractions:
            metrics["quest/trust_fraction"] = torch.stack([f.float() for f in fractions]).mean()
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.convert_on_fit_end and not trainer.interrupted:
            self.convert(pl_module)

    @staticmethod
    def convert(model: nn.Module) -> dict[str, QuestInt]:
        """Integer export: every QuEST layer becomes :class:`~lightning_ext.nn.quest.QuestInt` (codes + steps)."""
        return convert_quest(model)
