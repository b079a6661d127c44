"""GoRA — gradient-driven adaptive low-rank adaptation (He et al., arXiv 2502.12171): the calibration pass through
the module's own ``training_step`` (Lightning glue) here; ranks and ``B`` init in :mod:`lightning_ext.nn.gora`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_ext._checks import check_choice, check_int, check_number
from lightning_ext._lightning_compat import pending_ckpt_path
from lightning_ext.callbacks.adapters._base import adapter_attribute, calibration_batches, quantized_targets
from lightning_ext.callbacks.adapters.lora import LoRA
from lightning_ext.progress import setup_progress
from lightning_ext.surgery import select_modules

__all__ = ["GoRA"]


class GoRA(LoRA):
    """GoRA — gradient-driven adaptive low-rank adaptation (He et al., arXiv 2502.12171); math in
    :mod:`lightning_ext.nn.gora`.

    Before the optimizer exists, ``calibration_steps`` batches go through the module's own ``training_step``
    (logging muted) with only the target weights requiring gradients; their averaged gradient (all-reduced
    across ranks) sets the per-layer ranks (budget of uniform LoRA at ``r``, bounds ``[r_min, r_max]``) and
    ``B`` (one compressed gradient step of size ``gamma``, descent sign by default). ``A`` is peft's default
    random init, drawn from a generator seeded by ``seed`` (identical on every rank). The adapter is a plain
    LoRA with ``rank_pattern`` and rsLoRA scaling ``alpha / sqrt(r_l)``; the ranks are saved in the callback
    state and rebuilt from the checkpoint on resume (no recalibration). Logged: ``gora/rank/<layer>``.
    """

    method = "GoRA"
    non_config_args = ("calibration_dataloader",)

    def __init__(self, r: int = 8, alpha: float = 16.0, target_modules: str | list[str] = ("query", "value"),
                 r_min: int | None = None, r_max: int | None = None, gamma: float = 5e-2, sign: int = -1,
                 rounding: str = "round", calibration_steps: int = 8, calibration_dataloader: Iterable | None = None,
                 seed: int = 0, dropout: float = 0.0, attr: str | None = None,
                 modules_to_save: list[str] | None = None) -> None:
        check_int("seed", seed, 0)  # not optional here: GoRA's default is a fixed seed
        super().__init__(r, alpha, target_modules, dropout, attr, modules_to_save, use_rslora=True, seed=seed)
        check_int("r_min", r_min, 1, optional=True)
        check_int("r_max", r_max, 1, optional=True)
        check_number("gamma", gamma, 0.0, low_open=True)
        check_choice("sign", sign, (-1, 1))
        check_int("calibration_steps", calibration_steps, 1)
        self.r_min = max(1, r // 2) if r_min is None else r_min
        self.r_max = 4 * r if r_max is None else r_max
        if not 1 <= self.r_min <= r <= self.r_max:
            raise ValueError(f"need 1 <= r_min <= r <= r_max, got r_min={self.r_min}, r={r}, r_max={self.r_max}")
        from lightning_ext.nn.gora import ROUNDINGS

        check_choice("rounding", rounding, ROUNDINGS)
        self.gamma, self.sign, self.rounding = gamma, sign, rounding
        self.calibration_steps, self.calibration_dataloader = calibration_steps, calibration_dataloader
        self._grads: dict[str, torch.Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from peft import PeftModel

        attr = adapter_attribute(pl_module, self.attr)
        fresh = stage == "fit" and not isinstance(getattr(pl_module, attr), PeftModel)
        if fresh and pending_ckpt_path(trainer) is None:
            self._calibrate(trainer, pl_module, getattr(pl_module, attr))
        super().setup(trainer, pl_module, stage)

    def _calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """Average gradient of every target weight over the calibration batches, then the ranks."""
        from lightning_ext.nn.gora import allocate_ranks, importance

        quantized = quantized_targets(model, self.target_modules)
        if quantized:
            raise ValueError(f"GoRA needs the full-precision gradient of each target weight (importance |W*G| and the "
                             f"B init); {quantized[:3]}{'...' if len(quantized) > 3 else ''} are quantized "
                             "(bitsandbytes). Use LoRA, EVA, Bone(mode='bone') or LoTR on a quantized base.")
        targets = dict(select_modules(model, self.target_modules, types=[nn.Linear], what="GoRA target_modules"))
        batches = calibration_batches(trainer, self.calibration_dataloader, self.calibration_steps, "GoRA")
        device = trainer.strategy.root_device
        pl_module.to(device)
        flags = {p: p.requires_grad for p in pl_module.parameters()}
        for p in pl_module.parameters():
            p.requires_grad_(False)
        for m in targets.values():
            m.weight.requires_grad_(True)
            m.weight.grad = None
        muted = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        pl_module.__dict__.update(muted)
        try:
            for i, batch in enumerate(setup_progress(trainer, batches, "GoRA calibration", total=len(batches))):
                out = pl_module.training_step(move_data_to_device(batch, device), i)
                loss = out if isinstance(out, torch.Tensor) else out["loss"]
                loss.backward()
        finally:
            for key in muted:
                pl_module.__dict__.pop(key, None)
            for p, flag in flags.items():
                p.requires_grad_(flag)
        grads = {}
        for name, m in targets.items():
            g = m.weight.grad.float() / len(batches)
            m.weight.grad = None
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(g)
                g /= torch.distributed.get_world_size()
            grads[name] = g
        scores = {n: importance(targets[n].weight, g) for n, g in grads.items()}
        shapes = {n: tuple(targets[n].weight.shape) for n in grads}
        ranks = allocate_ranks(scores, shapes, self.r, self.r_min, self.r_max, self.rounding)
        self._grads = grads
        self.state = {"rank_pattern": ranks, "importance": scores}

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from peft import LoraConfig

        ranks = (saved or self.state).get("rank_pattern")
        if ranks is None:
            raise ValueError("GoRA has no calibrated ranks: calibration runs in a fit; to evaluate without one, "
                             "pass the fit's ckpt_path (its ranks are in the checkpoint)")
        return LoraConfig(**self.lora_kwargs(), rank_pattern=dict(ranks))

    def initialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, peft_model: nn.Module) -> None:
        from lightning_ext.nn.gora import gora_b_init

        base = peft_model.get_base_model()
        with torch.no_grad():
            for name, grad in self._grads.items():
                layer = base.get_submodule(name)
                a = layer.lora_A["default"].weight
                b = gora_b_init(grad.to(a.device), a, self.gamma, layer.scaling["default"], self.sign)
                layer.lora_B["default"].weight.copy_(b)
        self._grads = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ranks = self.state.get("rank_pattern", {})
        if ranks and trainer.logger is not None:
            trainer.logger.log_metrics({f"gora/rank/{n}": float(r) for n, r in ranks.items()}, step=0)
