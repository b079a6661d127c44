"""LoTR — low tensor rank adaptation (Bershatsky et al., arXiv 2402.01376): the callback; the peft tuner is
:mod:`lightning_ext.nn.lotr`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch import nn

from lightning_ext._checks import check_int, check_number
from lightning_ext.callbacks.adapters._base import PeftAdapter

__all__ = ["LoTR"]


class LoTR(PeftAdapter):
    """LoTR — low tensor rank adaptation (Bershatsky et al., arXiv 2402.01376): ``ΔW_k = s L G_k Rᵀ`` with ``L``, ``R``
    shared by all same-shaped targets and a small ``r × r`` core per layer (a peft tuner written here:
    :mod:`lightning_ext.nn.lotr`, registered as ``peft_type "LOTR"``). Starts at ΔW = 0 (cores zero); saves and
    reloads through peft's ``save_pretrained`` / ``PeftModel.from_pretrained`` (after
    ``import lightning_ext.nn.lotr``, which registers the type); :meth:`export_lora` writes an equivalent plain
    LoRA adapter (rank ``r``, scaling 1).
    """

    method = "LoTR"

    def __init__(self, r: int = 16, alpha: float = 1.0, target_modules: str | list[str] = ("query", "value"),
                 init_std: float = 1.0, attr: str | None = None, modules_to_save: list[str] | None = None,
                 seed: int | None = None) -> None:
        super().__init__(target_modules, attr, modules_to_save, seed)
        check_int("r", r, 1)
        check_number("alpha", alpha, 0.0, low_open=True)
        check_number("init_std", init_std, 0.0, low_open=True)
        self.r, self.alpha, self.init_std = r, alpha, init_std

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from lightning_ext.nn.lotr import LotrConfig

        return LotrConfig(r=self.r, alpha=self.alpha, target_modules=self.target_modules, init_std=self.init_std,
                          modules_to_save=self.modules_to_save)

    def export_lora(self, pl_module: pl.LightningModule, path: str) -> None:
        """Write the adapter as a plain peft LoRA (``B = s L G_k``, ``A = Rᵀ``, ``lora_alpha = r``): same outputs."""
        import copy

        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        from lightning_ext.nn.lotr import lotr_to_lora_state_dict

        peft_model = self.peft_model(pl_module)
        state, kwargs = lotr_to_lora_state_dict(peft_model)
        base = copy.deepcopy(peft_model).unload()
        lora = get_peft_model(base, LoraConfig(**kwargs))
        set_peft_model_state_dict(lora, state)
        lora.save_pretrained(path)
