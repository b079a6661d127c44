"""LoRA (Hu et al. 2021, arXiv 2106.09685) — peft's ``LoraConfig``; the baseline of the adapter family."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ext._checks import check_bool, check_int, check_number
from lightning_ext.callbacks.adapters._base import PeftAdapter

__all__ = ["LoRA"]


class LoRA(PeftAdapter):
    """Plain LoRA (Hu et al. 2021) through ``peft.LoraConfig`` — the baseline of the adapter family.

    Args:
        r / alpha / dropout: LoRA rank, ``lora_alpha``, ``lora_dropout``.
        target_modules: peft patterns (e.g. ``[query, value]``); attr / modules_to_save: see the module docstring.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        seed: seeds the adapters' random initialisation (``None``: the process's torch seed); see
            :meth:`PeftAdapter.setup_peft <lightning_ext.callbacks.adapters._base.PeftAdapter.setup_peft>`.
    """

    method = "LoRA"

    def __init__(self, r: int = 8, alpha: float = 16.0, target_modules: str | list[str] = ("query", "value"),
                 dropout: float = 0.0, attr: str | None = None, modules_to_save: list[str] | None = None,
                 use_rslora: bool = False, seed: int | None = None) -> None:
        super().__init__(target_modules, attr, modules_to_save, seed)
        check_int("r", r, 1)
        check_number("alpha", alpha, 0.0, low_open=True)
        check_number("dropout", dropout, 0.0, 1.0, high_open=True)
        check_bool("use_rslora", use_rslora)
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora

    def lora_kwargs(self) -> dict[str, Any]:
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                    modules_to_save=self.modules_to_save, use_rslora=self.use_rslora)

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from peft import LoraConfig

        return LoraConfig(**self.lora_kwargs())
