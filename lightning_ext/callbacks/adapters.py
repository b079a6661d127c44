"""Low-rank adapter callbacks built on peft: ``LoRA``, ``EVA``, ``Bone`` (GoRA and LoTR follow the same base).

Each callback, in ``setup`` (before the optimizer exists and before any distributed engine wraps the model),
replaces one attribute of the LightningModule — ``attr``, by default its single ``transformers.PreTrainedModel``
child — by ``peft.get_peft_model(model, config)``. The user's ``configure_optimizers`` then sees only the
adapter (and ``modules_to_save``) parameters as trainable. Target patterns follow peft's ``target_modules``
rules; a pattern that matches nothing is refused with the list of modules that exist.

Data-dependent structure (EVA's per-layer ranks) is kept in the callback state, so it is in every checkpoint;
when a fit resumes, ``setup`` reads it from the checkpoint file and rebuilds the same structure without
calibrating (the restore then loads the weights). :meth:`save_adapter` writes peft's format
(``save_pretrained``), :meth:`merge` folds the adapter into the base weights (``merge_and_unload``).

Written here: only the Lightning glue (attribute discovery, calibration data, resume) and GoRA's calibration
(:mod:`lightning_ext.nn.gora`). LoRA, EVA and MiSS are peft's (``LoraConfig``, ``init_lora_weights="eva"`` +
``initialize_lora_eva_weights``, ``MissConfig``); GoRA is expressed as a plain ``LoraConfig`` with ``rank_pattern``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ext._bnb_compat import keep_training_layout
from lightning_ext._lightning_compat import pending_ckpt_path
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.optimizer_injection import deepspeed_stage
from lightning_ext.manifest import load_checkpoint_dict, saved_callback_state
from lightning_ext.surgery import SurgeryError, select_modules

__all__ = ["Bone", "EVA", "GoRA", "LoRA", "LoTR", "adapter_attribute", "calibration_batches"]


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


class _PeftAdapter(Technique):
    """Shared glue; subclasses implement :meth:`build_config` (and optionally :meth:`initialize`)."""

    method = "adapter"
    identity_args = ("attr", "target_modules")  # two adapters on different models of one module can coexist

    def __init__(self, target_modules: str | list[str], attr: str | None = None,
                 modules_to_save: list[str] | None = None) -> None:
        super().__init__()
        if not target_modules:
            raise ValueError("target_modules must name at least one module (peft's patterns)")
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
        from peft import get_peft_model

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


class LoRA(_PeftAdapter):
    """Plain LoRA (Hu et al. 2021) through ``peft.LoraConfig`` — the baseline of the adapter family.

    Args:
        r / alpha / dropout: LoRA rank, ``lora_alpha``, ``lora_dropout``.
        target_modules: peft patterns (e.g. ``[query, value]``); attr / modules_to_save: see the module docstring.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
    """

    method = "LoRA"

    def __init__(self, r: int = 8, alpha: float = 16.0, target_modules: str | list[str] = ("query", "value"),
                 dropout: float = 0.0, attr: str | None = None, modules_to_save: list[str] | None = None,
                 use_rslora: bool = False) -> None:
        super().__init__(target_modules, attr, modules_to_save)
        if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
            raise ValueError(f"need r >= 1, alpha > 0, 0 <= dropout < 1; got r={r}, alpha={alpha}, dropout={dropout}")
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, dropout, use_rslora

    def lora_kwargs(self) -> dict[str, Any]:
        return dict(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
                    modules_to_save=self.modules_to_save, use_rslora=self.use_rslora)

    def build_config(self, model: nn.Module, saved: dict[str, Any] | None) -> Any:
        from peft import LoraConfig

        return LoraConfig(**self.lora_kwargs())


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
                 dropout: float = 0.0, attr: str | None = None, modules_to_save: list[str] | None = None) -> None:
        super().__init__(r, alpha, target_modules, dropout, attr, modules_to_save)
        if rho < 1 or not 0 <= tau <= 1:
            raise ValueError(f"need rho >= 1 and 0 <= tau <= 1; got rho={rho}, tau={tau}")
        if use_label_mask not in (True, False, "auto"):
            raise ValueError(f"use_label_mask must be True, False or 'auto', got {use_label_mask!r}")
        if calibration_batches is not None and calibration_batches < 1:
            raise ValueError(f"calibration_batches must be >= 1 or None, got {calibration_batches}")
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


BONE_MODES = {"bat": "bat", "bone": True, "mini": "mini"}


class Bone(_PeftAdapter):
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
                 modules_to_save: list[str] | None = None) -> None:
        super().__init__(target_modules, attr, modules_to_save)
        if mode not in BONE_MODES:
            raise ValueError(f"mode must be one of {list(BONE_MODES)}, got {mode!r}")
        if r < 1 or mini_r < 1 or not 0 <= dropout < 1:
            raise ValueError(f"need r >= 1, mini_r >= 1, 0 <= dropout < 1; got {r}, {mini_r}, {dropout}")
        self.r, self.mode, self.mini_r, self.dropout = r, mode, mini_r, dropout

    def check_strategy(self, trainer: pl.Trainer) -> None:
        if self.mode == "bat" and deepspeed_stage(trainer) == 3:
            raise ValueError("Bone mode='bat' with DeepSpeed ZeRO stage 3 is not supported: the block-affine update "
                             "reads the base weight outside the base layer's forward, where ZeRO-3 has not gathered "
                             "it. Use mode='bone', or ZeRO stage 1/2.")

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
        super().__init__(r, alpha, target_modules, dropout, attr, modules_to_save, use_rslora=True)
        self.r_min = max(1, r // 2) if r_min is None else r_min
        self.r_max = 4 * r if r_max is None else r_max
        if not 1 <= self.r_min <= r <= self.r_max:
            raise ValueError(f"need 1 <= r_min <= r <= r_max, got r_min={self.r_min}, r={r}, r_max={self.r_max}")
        if sign not in (-1, 1) or not gamma > 0 or calibration_steps < 1:
            raise ValueError(f"need sign in (-1, +1), gamma > 0, calibration_steps >= 1; got {sign}, {gamma}, "
                             f"{calibration_steps}")
        from lightning_ext.nn.gora import ROUNDINGS

        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
        self.gamma, self.sign, self.rounding, self.seed = gamma, sign, rounding, seed
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
            for i, batch in enumerate(batches):
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

    def setup_peft(self, config: Any, model: nn.Module) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the random A: identical on every rank
            return super().setup_peft(config, model)

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


class LoTR(_PeftAdapter):
    """LoTR — low tensor rank adaptation (Bershatsky et al., arXiv 2402.01376): ``ΔW_k = s L G_k Rᵀ`` with ``L``, ``R``
    shared by all same-shaped targets and a small ``r × r`` core per layer (a peft tuner written here:
    :mod:`lightning_ext.nn.lotr`, registered as ``peft_type "LOTR"``). Starts at ΔW = 0 (cores zero); saves and
    reloads through peft's ``save_pretrained`` / ``PeftModel.from_pretrained`` (after
    ``import lightning_ext.nn.lotr``, which registers the type); :meth:`export_lora` writes an equivalent plain
    LoRA adapter (rank ``r``, scaling 1).
    """

    method = "LoTR"

    def __init__(self, r: int = 16, alpha: float = 1.0, target_modules: str | list[str] = ("query", "value"),
                 init_std: float = 1.0, attr: str | None = None, modules_to_save: list[str] | None = None) -> None:
        super().__init__(target_modules, attr, modules_to_save)
        if r < 1 or not alpha > 0 or not init_std > 0:
            raise ValueError(f"need r >= 1, alpha > 0, init_std > 0; got r={r}, alpha={alpha}, init_std={init_std}")
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
