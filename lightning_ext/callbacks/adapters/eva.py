"""EVA — explained-variance adaptation (Paischer et al., arXiv 2410.07170): peft's implementation, with the
calibration batches and the resume path added here."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from lightning_ext._checks import check_bool, check_choice, check_int, check_number
from lightning_ext.callbacks.adapters._base import calibration_batches
from lightning_ext.callbacks.adapters.lora import LoRA

__all__ = ["EVA"]


class EVA(LoRA):
    """EVA — explained-variance adaptation (Paischer et al., arXiv 2410.07170), peft's implementation.

    A = the top right-singular vectors of each layer's input activations (incremental PCA over calibration
    batches), B = 0 (outputs equal the base model at init, base weights untouched), ranks redistributed by
    explained variance within the budget ``r × layers`` (``rho``). Calibration data: ``calibration_dataloader``,
    else the datamodule's ``calibration_dataloader()`` / ``train_dataloader()``; the first
    ``calibration_batches`` batches. Batches are dicts passed as ``model(**batch)``.

    ``use_label_mask="auto"`` turns peft's label mask off when ``labels`` has shape ``[B]`` (classification),
    where peft's default crashes (or silently masks wrong positions when B equals the sequence length).
    Every rank calibrates on the same batches (the loader is not distributed), so ranks agree without gathering.
    """

    method = "EVA"
    non_config_args = ("calibration_dataloader",)  # data: not in the manifest, not compared on resume

    def __init__(self, r: int = 8, alpha: float = 16.0, target_modules: str | list[str] = ("query", "value"),
                 rho: float = 2.0, tau: float = 0.99, whiten: bool = False, use_label_mask: bool | str = "auto",
                 calibration_dataloader: Iterable | None = None, calibration_batches: int | None = 8,
                 dropout: float = 0.0, attr: str | None = None, modules_to_save: list[str] | None = None,
                 seed: int | None = None) -> None:
        super().__init__(r, alpha, target_modules, dropout, attr, modules_to_save, seed=seed)
        check_number("rho", rho, 1.0)
        check_number("tau", tau, 0.0, 1.0)
        check_bool("whiten", whiten)
        check_choice("use_label_mask", use_label_mask, (True, False, "auto"))
        check_int("calibration_batches", calibration_batches, 1, optional=True)
        self.rho, self.tau, self.whiten, self.use_label_mask = rho, tau, whiten, use_label_mask
        self.calibration_dataloader, self.n_calibration = calibration_dataloader, calibration_batches

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from peft import EvaConfig, LoraConfig

        if saved is not None:  # resume: the calibrated structure, standard init (the restore fills it)
            return LoraConfig(**self.lora_kwargs(), rank_pattern=saved["rank_pattern"],
                              alpha_pattern=saved["alpha_pattern"])
        return LoraConfig(**self.lora_kwargs(), init_lora_weights="eva",
                          eva_config=EvaConfig(rho=self.rho, tau=self.tau, whiten=self.whiten,
                                               use_label_mask=self.use_label_mask is True))

    def initialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, peft_model: nn.Module) -> None:
        from peft import initialize_lora_eva_weights

        batches = calibration_batches(trainer, self.calibration_dataloader, self.n_calibration, "EVA")
        if not isinstance(batches[0], dict):
            raise TypeError("EVA calibration batches must be dicts of model inputs (model(**batch))")
        labels = batches[0].get("labels")
        if self.use_label_mask is True and labels is not None and labels.dim() == 1:
            raise ValueError("EVA: use_label_mask=True needs token-level labels [B, T]; these labels have shape "
                             f"{tuple(labels.shape)} (classification). Use use_label_mask='auto' or False.")
        device = trainer.strategy.root_device
        peft_model.to(device)
        moved = [move_data_to_device(b, device) for b in batches]
        was_training = peft_model.training
        peft_model.eval()
        initialize_lora_eva_weights(peft_model, dataloader=moved, gather_distributed_inputs=False,
                                    show_progress_bar=trainer.is_global_zero
                                    and trainer.progress_bar_callback is not None)
        peft_model.train(was_training)
        config = peft_model.peft_config["default"]
        self.state = {"rank_pattern": dict(config.rank_pattern or {}),
                      "alpha_pattern": dict(config.alpha_pattern or {})}
