"""``OneBit``: 1-bit weights (sign + two value vectors) with SVID initialisation and knowledge distillation from
the full-precision model, as a Lightning callback (Xu et al., NeurIPS 2024; math in :mod:`lightning_ext.nn.onebit`).

``setup`` (before the optimizer exists and before any checkpoint is restored):

1. with ``distill=True``, a frozen copy of the module (or of its ``module`` attribute) is kept as the teacher —
   outside the LightningModule, so it is in no checkpoint and no DDP/DeepSpeed wrapper (replicated per
   process). It is the model as built by the user's code, i.e. the pretrained full-precision weights;
2. the target ``nn.Linear`` layers become :class:`~lightning_ext.nn.onebit.OneBitLinear` — SVID-initialised,
   except when resuming (``ckpt_path`` given: the structure is built and the checkpoint fills it);
3. ``freeze`` names modules kept frozen (the reference freezes embeddings and ``lm_head``).

Training: ``training_step`` is wrapped; the student's forward is hooked to capture its inputs, the teacher runs
on the same inputs under ``no_grad``, and the loss becomes ``ce_weight · loss + kl_weight · KL + mse_weight ·
MSE`` (:func:`~lightning_ext.nn.onebit.distillation_loss`; paper formula, per-token KL — the reference's scale is
explained there). Hidden states: outputs of the modules matching ``hidden_modules`` (same names in student and
teacher). Logged: ``onebit/kl``, ``onebit/mse``. ``export`` packs the layers (8 signs per byte).

YAML::

    trainer:
      callbacks:
        - class_path: lightning_ext.callbacks.OneBit
          init_args: {targets: ['blocks\\.\\d+\\.fc'], freeze: [embed, head], hidden_modules: ['blocks\\.\\d+']}
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_ext._checks import check_bool, check_choice, check_names, check_number, check_str
from lightning_ext._lightning_compat import pending_ckpt_path
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.step_wrapper import unwrap_training_step, wrap_training_step
from lightning_ext.nn.onebit import INITS, OneBitLinear, OneBitPacked, distillation_loss, export_packed, output_logits
from lightning_ext.surgery import OUTPUT_HEADS, replace_modules, select_modules

__all__ = ["OneBit"]


class OneBit(Technique):
    """OneBit 1-bit QAT with SVID init and distillation from the full-precision model.

    Args:
        targets: name patterns of the ``nn.Linear`` layers to make 1-bit (peft's rules); default every Linear.
        exclude: names left in full precision (default: output heads).
        init: ``"svd"`` (default), ``"nmf"`` or ``"naive"`` (skipped when resuming).
        latent_scale: magnitude of the latent weight at init (reference 0.01).
        layer_norm: the parameter-free LayerNorm after each 1-bit layer.
        freeze: name patterns of modules whose parameters stay frozen (e.g. ``[embed, lm_head]``).
        distill: train against the frozen full-precision copy (else the module's own loss only).
        module: attribute of the LightningModule that is distilled (default: the LightningModule itself; its
            forward must be what ``training_step`` calls and must return logits).
        kl_weight / mse_weight / ce_weight: weights of the KD terms and of the module's own loss.
        hidden_modules: name patterns (relative to ``module``) whose outputs enter the hidden-state MSE.
        fused: the value vectors applied to the weight by C++ CPU kernels (:mod:`lightning_ext.nn.onebit_fused`):
            ``None`` (default) where they run, else the eager path with one log line; ``True`` always (an error
            where they cannot run); ``False`` the eager reference.
    """

    def __init__(self, targets: str | list[str] | None = None, exclude: str | list[str] | None = list(OUTPUT_HEADS),
                 init: str = "svd", latent_scale: float = 0.01, layer_norm: bool = True,
                 freeze: str | list[str] | None = None, distill: bool = True, module: str | None = None,
                 kl_weight: float = 1.0, mse_weight: float = 1.0, ce_weight: float = 0.0,
                 hidden_modules: str | list[str] | None = None, fused: bool | None = None) -> None:
        super().__init__()
        check_bool("fused", fused, optional=True)
        check_names("targets", targets, optional=True)
        check_names("exclude", exclude, optional=True, allow_empty=True)
        check_choice("init", init, INITS)
        check_number("latent_scale", latent_scale, 0.0, low_open=True)
        check_bool("layer_norm", layer_norm)
        check_names("freeze", freeze, optional=True, allow_empty=True)
        check_bool("distill", distill)
        check_str("module", module, optional=True)
        for name, value in (("kl_weight", kl_weight), ("mse_weight", mse_weight), ("ce_weight", ce_weight)):
            check_number(name, value, 0.0)
        check_names("hidden_modules", hidden_modules, optional=True)
        if distill and kl_weight == mse_weight == ce_weight == 0:
            raise ValueError("kl_weight, mse_weight and ce_weight are all 0: nothing to train on")
        self.targets, self.exclude, self.init, self.latent_scale = targets, exclude, init, latent_scale
        self.layer_norm, self.freeze, self.distill, self.module = layer_norm, freeze, distill, module
        self.kl_weight, self.mse_weight, self.ce_weight = kl_weight, mse_weight, ce_weight
        self.hidden_modules, self.fused = hidden_modules, fused
        self.teacher: nn.Module | None = None
        self._wrapped = None
        self._captured: dict[str, Any] = {}
        self._recording = False

    # -- surgery ---------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, init: bool = True) -> dict[str, OneBitLinear]:
        """Swap the targets (all or nothing, idempotent); SVID only with ``init``. Usable without a Trainer."""
        selected = select_modules(model, self.targets, types=[nn.Linear, OneBitLinear], exclude=self.exclude,
                                  what="OneBit targets")
        todo = [n for n, m in selected if not isinstance(m, OneBitLinear)]
        if todo:
            replace_modules(model, todo, lambda _, old: OneBitLinear.from_linear(
                old, self.init if init else None, self.latent_scale, self.layer_norm, self.fused), technique="OneBit")
        if self.freeze is not None:
            frozen = select_modules(model, self.freeze, what="OneBit freeze")
            for _, m in frozen:
                m.requires_grad_(False)
        return {n: model.get_submodule(n) for n, _ in selected}

    def _student(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.module is None else getattr(pl_module, self.module)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        student = self._student(pl_module)
        already = any(isinstance(m, OneBitLinear) for m in student.modules())
        if stage == "fit" and self.distill and self.teacher is None:
            if already:
                raise ValueError("OneBit: the model already has OneBitLinear layers, so no full-precision teacher "
                                 "can be copied from it; apply the callback to the full-precision model")
            self.teacher = self._copy_teacher(student)
        self.prepare(student, init=pending_ckpt_path(trainer) is None)
        if stage == "fit" and self.distill and self._wrapped is None:
            self._install(pl_module, student)

    @staticmethod
    def _copy_teacher(student: nn.Module) -> nn.Module:
        trainer_ref = student.__dict__.get("_trainer")
        if trainer_ref is not None:
            student._trainer = None  # never deep-copy the Trainer
        try:
            teacher = copy.deepcopy(student)
        finally:
            if trainer_ref is not None:
                student._trainer = trainer_ref
        teacher.requires_grad_(False)
        return teacher.eval()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is not None:
            param = next(self._student(pl_module).parameters())
            self.teacher.to(param.device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._wrapped is not None and stage == "fit":
            unwrap_training_step(*self._wrapped)
            for handle in self._handles:
                handle.remove()
            self._wrapped = None

    # -- distillation ----------------------------------------------------------------------------
    def _hooked(self, root: nn.Module, store: list) -> list:
        if self.hidden_modules is None:
            return []
        mods = select_modules(root, self.hidden_modules, what="OneBit hidden_modules")

        def record(_module, _inputs, out):
            if self._recording:  # only inside the wrapped training_step (not validation)
                store.append(out if isinstance(out, torch.Tensor) else out[0])

        return [m.register_forward_hook(record) for _, m in mods]

    def _install(self, pl_module: pl.LightningModule, student: nn.Module) -> None:
        student_hidden: list = []
        teacher_hidden: list = []

        def capture(_module, args, kwargs, output):
            if torch.is_grad_enabled() and student.training:
                self._captured = {"args": args, "kwargs": kwargs, "output": output}

        self._handles = [student.register_forward_hook(capture, with_kwargs=True),
                         *self._hooked(student, student_hidden), *self._hooked(self.teacher, teacher_hidden)]

        def wrap(original):
            def training_step(*args: Any, **kwargs: Any) -> Any:
                self._captured = {}
                student_hidden.clear()
                teacher_hidden.clear()
                self._recording = True
                try:
                    output = original(*args, **kwargs)
                    with torch.no_grad():
                        if self._captured:
                            # the teacher keeps its own precision (fp32), whatever the engine made of the
                            # student (DeepSpeed's bf16 hands it bf16 inputs)
                            teacher_out = self.teacher(*_as_dtype(self._captured["args"], self._teacher_dtype),
                                                       **_as_dtype(self._captured["kwargs"], self._teacher_dtype))
                finally:
                    self._recording = False
                if not self._captured:
                    raise RuntimeError("OneBit distillation: training_step did not call the distilled module "
                                       f"({'the LightningModule' if self.module is None else self.module!r}) with "
                                       "gradients on; call self(...) (or pass module=...)")
                kd = distillation_loss(output_logits(self._captured["output"]), output_logits(teacher_out), list(student_hidden),
                                       list(teacher_hidden), self.kl_weight, self.mse_weight)
                self._captured = {}
                loss = output if isinstance(output, torch.Tensor) else output["loss"]
                total = kd["loss"] + (self.ce_weight * loss if self.ce_weight else 0.0)
                pl_module.log_dict({"onebit/kl": kd["kl"], "onebit/mse": kd["mse"]}, on_step=True, on_epoch=False)
                return total if isinstance(output, torch.Tensor) else {**output, "loss": total}
            return training_step

        self._teacher_dtype = next(self.teacher.parameters()).dtype
        self._wrapped = (pl_module, wrap_training_step(pl_module, wrap))

    @staticmethod
    def export(model: nn.Module) -> dict[str, OneBitPacked]:
        """Pack every :class:`OneBitLinear` (8 signs per byte + g, h): same outputs, buffers only."""
        return export_packed(model)


def _as_dtype(inputs: Any, dtype: torch.dtype) -> Any:
    """``inputs`` with every floating-point tensor cast to ``dtype`` (others untouched)."""
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(inputs, torch.Tensor, lambda t: t.to(dtype) if t.is_floating_point() else t)
