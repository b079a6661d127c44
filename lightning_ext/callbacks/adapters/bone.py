"""Bone — block-affine adaptation (Kang, arXiv 2409.15371), on peft's successor ``MissConfig`` (MiSS)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_ext._checks import check_choice, check_int, check_number
from lightning_ext.callbacks.adapters._base import PeftAdapter, quantized_targets
from lightning_ext.surgery import SurgeryError, select_modules

__all__ = ["BONE_MODES", "Bone"]


BONE_MODES = {"bat": "bat", "bone": True, "mini": "mini"}


class Bone(PeftAdapter):
    """Bone — block-affine adaptation (Kang, arXiv 2409.15371), on peft's successor ``MissConfig`` (MiSS).

    Names: peft removed ``BoneConfig``; the paper was renamed Bone → DiSHA → MiSS over its versions. ``mode``:

    * ``"bat"`` (default) — the block-affine transform ``W'_ij = W_ij (I + B_i) + B_i`` (Bone v1–v3 "Block Affine
      Transformation", later "Bat"; MiSS ``init_weights="bat"``); needs ``r`` to divide in and out;
    * ``"bone"`` — the later Bone / MiSS default: one zero-initialised ``r × out`` block shared by the input chunks
      (``init_weights=True``);
    * ``"mini"`` — MiSS's smaller shared block (``mini_r``).

    All start at ΔW = 0. ``bat`` reads the base weight inside the adapter's forward: refused under DeepSpeed ZeRO-3
    and on quantized base layers.
    """

    method = "Bone"

    def __init__(self, r: int = 16, target_modules: str | list[str] = ("query", "value"), mode: str = "bat",
                 mini_r: int = 1, dropout: float = 0.0, attr: str | None = None,
                 modules_to_save: list[str] | None = None, seed: int | None = None) -> None:
        super().__init__(target_modules, attr, modules_to_save, seed)
        check_choice("mode", mode, BONE_MODES)
        check_int("r", r, 1)
        check_int("mini_r", mini_r, 1)
        check_number("dropout", dropout, 0.0, 1.0, high_open=True)
        self.r, self.mode, self.mini_r, self.dropout = r, mode, mini_r, dropout

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from peft import MissConfig

        if self.mode == "bat":
            quantized = quantized_targets(model, self.target_modules)
            if quantized:
                raise ValueError(f"Bone mode='bat' rewrites the full-precision base weight; {quantized} are quantized "
                                 "(bitsandbytes). Use mode='bone' on a quantized base.")
            bad = [(n, tuple(m.weight.shape)) for n, m in select_modules(model, self.target_modules)
                   if hasattr(m, "weight") and (m.weight.shape[0] % self.r or m.weight.shape[1] % self.r)]
            if bad:
                raise SurgeryError(f"Bone mode='bat' needs r={self.r} to divide in and out features; not: {bad}")
        return MissConfig(r=self.r, init_weights=BONE_MODES[self.mode], mini_r=self.mini_r,
                          miss_dropout=self.dropout, target_modules=self.target_modules,
                          modules_to_save=self.modules_to_save)
