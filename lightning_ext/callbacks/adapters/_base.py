"""Shared glue of the peft adapter callbacks (LoRA, EVA, GoRA, Bone, LoTR): one file per method beside it.

Each callback, in ``setup`` (before the optimizer exists and before any distributed engine wraps the model),
replaces one attribute of the LightningModule — ``attr``, by default its single ``transformers.PreTrainedModel``
child — by ``peft.get_peft_model(model, config)``. The user's ``configure_optimizers`` then sees only the
adapter (and ``modules_to_save``) parameters as trainable. Target patterns follow peft's ``target_modules``
rules; a pattern that matches nothing is refused with the list of modules that exist.

The random initialisation (LoRA's A, LoTR's factors, GoRA's A) is drawn from a generator seeded by the
callback's ``seed`` (default: the process's torch seed), not from wherever the global stream stands at ``setup``:
one process and every rank of a DDP or DeepSpeed run start from the same adapter, so a 2-rank run computes what
one process computes (``tests/test_ranks.py``).

Data-dependent structure (EVA's and GoRA's per-layer ranks) is kept in the callback state, so it is in every
checkpoint; when a fit resumes, ``setup`` reads it from the checkpoint file and rebuilds the same structure
without calibrating (the restore then loads the weights). :meth:`PeftAdapter.save_adapter` writes peft's format
(``save_pretrained``), :meth:`PeftAdapter.merge` folds the adapter into the base weights (``merge_and_unload``).

Written here: only the Lightning glue (attribute discovery, calibration data, resume). The methods are peft's
(``LoraConfig``, EVA's ``initialize_lora_eva_weights``, ``MissConfig``) or a peft tuner in ``nn/`` (LoTR); GoRA's
math is :mod:`lightning_ext.nn.gora`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ext._bnb_compat import keep_training_layout
from lightning_ext._checks import check_int, check_names, check_str
from lightning_ext._lightning_compat import pending_ckpt_path
from lightning_ext.callbacks.base import Technique
from lightning_ext.manifest import load_checkpoint_dict, saved_callback_state
from lightning_ext.surgery import select_modules

__all__ = ["PeftAdapter", "adapter_attribute", "calibration_batches", "quantized_targets"]


def adapter_attribute(pl_module: pl.LightningModule, attr: str | None) -> str:
    """The attribute holding the model to adapt: ``attr``, else the single ``PreTrainedModel``/``PeftModel`` child."""
    if attr is not None:
        if not isinstance(getattr(pl_module, attr, None), nn.Module):
            raise ValueError(f"{type(pl_module).__name__} has no module attribute {attr!r}; children: "
                             f"{[n for n, _ in pl_module.named_children()]}")
        return attr
    from peft import PeftModel
    from transformers import PreTrainedModel

    found = [n for n, m in pl_module.named_children() if isinstance(m, (PreTrainedModel, PeftModel))]
    if len(found) != 1:
        raise ValueError(f"cannot choose the model to adapt: {type(pl_module).__name__} has {len(found)} "
                         f"PreTrainedModel children ({found}); pass attr=... (children: "
                         f"{[n for n, _ in pl_module.named_children()]})")
    return found[0]


def calibration_batches(trainer: pl.Trainer, dataloader: Iterable | None, limit: int | None,
                        who: str) -> list[Any]:
    """Calibration batches: the explicit ``dataloader``, else the datamodule's ``calibration_dataloader()`` if it
    has one, else its ``train_dataloader()``; the first ``limit`` batches, as a list (``len()`` works)."""
    if dataloader is None:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "calibration_dataloader"):
            dataloader = dm.calibration_dataloader()
        elif dm is not None:
            dataloader = dm.train_dataloader()  # before the fit loop: the datamodule sets itself up if needed
        else:
            raise ValueError(f"{who} needs calibration data: pass calibration_dataloader=... or fit with a "
                             "datamodule (its calibration_dataloader() or train_dataloader() is used)")
    batches = []
    for batch in dataloader:
        if limit is not None and len(batches) >= limit:
            break
        batches.append(batch)
    if not batches:
        raise ValueError(f"{who}: the calibration dataloader is empty")
    return batches


def quantized_targets(model: nn.Module, patterns: str | list[str]) -> list[str]:
    """Targets whose base layer is a bitsandbytes quantized layer (QLoRA-style base)."""
    return [n for n, m in select_modules(model, patterns) if type(m).__module__.startswith("bitsandbytes")]


class PeftAdapter(Technique):
    """Shared glue; a method subclasses it and implements :meth:`build_config` (and optionally :meth:`initialize`,
    :meth:`check_strategy`)."""

    method = "adapter"
    identity_args = ("attr", "target_modules")  # two adapters on different models of one module can coexist

    def __init__(self, target_modules: str | list[str], attr: str | None = None,
                 modules_to_save: list[str] | None = None, seed: int | None = None) -> None:
        super().__init__()
        check_names("target_modules", target_modules)
        check_str("attr", attr, optional=True)
        check_names("modules_to_save", modules_to_save, optional=True)
        check_int("seed", seed, 0, optional=True)
        self.seed = seed
        if not isinstance(target_modules, str):  # a regex string, else a list (a tuple default is not YAML/peft)
            target_modules = list(target_modules)
        self.target_modules, self.attr, self.modules_to_save = target_modules, attr, modules_to_save
        self.attr_name: str | None = None

    # -- to implement ----------------------------------------------------------------------------
    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        raise NotImplementedError

    def initialize(self, trainer: pl.Trainer, pl_module: pl.LightningModule, peft_model: nn.Module) -> None:
        """Data-dependent initialisation on a fresh run (not on resume)."""

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse unsupported strategy combinations (called in setup)."""

    # -- glue --------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        from peft import PeftModel

        self.check_strategy(trainer)
        self.attr_name = adapter_attribute(pl_module, self.attr)
        model = getattr(pl_module, self.attr_name)
        repacked = keep_training_layout(model)  # a 4-bit base stays trainable through eval-mode passes
        if repacked:
            rank_zero_warn(f"{self.method}: bitsandbytes had re-packed {len(repacked)} 4-bit base layers for CPU "
                           f"inference before this {stage} (e.g. {repacked[0]}); they are back in the training "
                           "layout, with bitsandbytes' bf16-rounded block scales")
        if isinstance(model, PeftModel):  # idempotent (fit then test, or a second fit) ...
            owner = getattr(model, "_lightning_ext_adapter", self.state_key)
            if owner != self.state_key:  # ... but not a second adapter on top of another one
                raise ValueError(f"{self.method}: {type(pl_module).__name__}.{self.attr_name} is already adapted by "
                                 f"{owner}; use one adapter callback per model (list all its target_modules there)")
            return
        select_modules(model, self.target_modules, what=f"{self.method} target_modules")  # lists what exists
        ckpt = pending_ckpt_path(trainer)
        saved = saved_callback_state(load_checkpoint_dict(ckpt), self) if ckpt is not None else None
        config = self.build_config(model, saved)
        peft_model = self.setup_peft(config, model)
        if saved is None and stage == "fit":
            self.initialize(trainer, pl_module, peft_model)
        elif saved is not None:
            self.state = dict(saved)
        peft_model._lightning_ext_adapter = self.state_key
        setattr(pl_module, self.attr_name, peft_model)

    def setup_peft(self, config: Any, model: nn.Module) -> nn.Module:
        """peft's surgery, its random initialisation drawn from a generator seeded by ``seed`` (``None``: the
        process's torch seed, ``torch.initial_seed()``, which ``seed_everything`` sets). The draw therefore does
        not depend on how many random numbers were drawn before ``setup``: Lightning re-seeds each launched
        process, so one process and every DDP/DeepSpeed rank would otherwise start from different adapters."""
        from peft import get_peft_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch.initial_seed() if self.seed is None else self.seed)
            return get_peft_model(model, config)

    def peft_model(self, pl_module: pl.LightningModule) -> nn.Module:
        return getattr(pl_module, self.attr_name or adapter_attribute(pl_module, self.attr))

    def save_adapter(self, pl_module: pl.LightningModule, path: str) -> None:
        """peft's format (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        self.peft_model(pl_module).save_pretrained(path)

    def merge(self, pl_module: pl.LightningModule) -> nn.Module:
        """Fold the adapter into the base weights (``merge_and_unload``) and put the plain model back."""
        merged = self.peft_model(pl_module).merge_and_unload()
        setattr(pl_module, self.attr_name, merged)
        return merged
