"""``NonFiniteGuard``: an optimizer step whose loss or gradients are not finite is skipped on every rank alike.

One NaN sample otherwise reaches the weights through the optimizer and, a few steps later, every weight and
every moment of the optimizer state is NaN while the fit ends "normally". The guard is **on by default**: every
technique callback and the CLI add one to their trainer unless one is there (``NonFiniteGuard(enabled=False)``
in the callback list switches it off). In a plain Python Trainer without techniques, add it yourself.

What a step is checked for (one all-reduce of two flags and one host sync per optimizer step):

* the **loss** of every micro-batch that reaches ``backward`` (``on_before_backward``: Lightning's closure and
  CrAM's second pass), as a device flag without a host sync;
* the **gradients** the optimizer is about to apply, on this rank's storage: ``.grad`` of the optimizer's
  parameters (under FSDP2 the local dim-0 shards) read in the optimizer's ``step`` itself, after every hook of
  the step has run (CrAM's second pass included), so the callback's place in the list does not matter. Under
  DeepSpeed ZeRO the reduced gradients live in the engine's partitions: the engine's own check of the global
  gradient norm decides (it skips a step whose norm is not finite; the guard turns that check on for bf16,
  where DeepSpeed leaves it off) and the guard reads its verdict (``overflow``) after the step.

The verdict is all-reduced (max) over the ranks, so every rank skips or steps alike. A skipped step leaves
untouched: the weights and the optimizer state (the optimizer's ``step`` is not called — LAWN's norms, CrAM's
step counter and sparsity draw, the moments of AdamP/FAdam with it), BatchNorm running statistics (restored from
a copy taken before the step's first forward: the NaN batch went through them), and the techniques' own state
(LossReweighting's weights and CLNP's penalty are per batch; EVA's and GoRA's statistics are computed before
training). The gradients are cleared.

Counted, logged and bounded: each skip is a warning naming the step and whether the loss or the gradients were
non-finite; ``nonfinite/skipped_steps`` is logged from the first skip on; the counts are in the callback's state
(they survive a resume). After ``max_consecutive`` skips in a row the fit stops with an error.

A decision, documented: ``trainer.global_step`` counts a skipped step, as Lightning counts a step its 16-mixed
GradScaler skips; so do LR schedulers and schedules keyed on the global step (QuEST's ``start_step``,
LossReweighting's ``warmup_steps``), which therefore run one step ahead of a run whose bad batch was removed. The
optimizers' own counters (AdamW's bias correction, LAWN's free phase, CrAM's draws) do not count it.

Under 16-mixed the GradScaler already skips a step whose unscaled gradients overflow (and lowers its scale):
that is the scaler's business and not counted; a step whose *loss* was non-finite is counted as skipped. An
optimizer that evaluates the closure itself (``torch.optim.LBFGS``, CrAM's optimizer used without its callback)
is left unguarded, with one warning: the check cannot sit between its closure and its update.

Written by hand: Lightning has no such callback (``detect_anomaly`` raises, and only in the backward), torch's
GradScaler skips only under fp16 loss scaling, DeepSpeed's skip covers its gradients only and not in bf16.
"""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_ext._checks import check_bool, check_int
from lightning_ext.nn.pruning import restore_running_stats, running_stats

__all__ = ["NonFiniteGuard", "ensure_guard"]


class NonFiniteGuard(pl.Callback):
    """Skip an optimizer step whose loss or gradients are not finite, on every rank alike.

    Args:
        enabled: ``False`` switches the guard off (the trainer then gets no default one either).
        max_consecutive: stop the fit with an error after this many skipped steps in a row (>= 1); ``None``
            never stops.

    YAML (the default, written out)::

        trainer:
          callbacks:
            - class_path: lightning_ext.callbacks.NonFiniteGuard
              init_args: {enabled: true, max_consecutive: 10}
    """

    def __init__(self, enabled: bool = True, max_consecutive: int | None = 10) -> None:
        check_bool("enabled", enabled)
        check_int("max_consecutive", max_consecutive, 1, optional=True)
        self.enabled, self.max_consecutive = enabled, max_consecutive
        self.state: dict[str, Any] = {"skipped": 0, "consecutive": 0, "last": []}
        self._installed: list[tuple[torch.optim.Optimizer, Any]] = []
        self._trainer: pl.Trainer | None = None
        self._zero: Any = None  # DeepSpeed's ZeRO optimizer, under DeepSpeed
        self._norm_layers: list[nn.Module] = []  # the module's normalization layers
        self._reset_step()

    def _reset_step(self) -> None:
        self._bad_loss: torch.Tensor | None = None
        self._verdict: tuple[bool, bool] | None = None  # (loss, gradients) non-finite, decided for this step
        self._norms: list[tuple[nn.Module, dict[str, torch.Tensor]]] | None = None  # BatchNorm stats before it
        self._boundary = False  # DeepSpeed: this micro-batch ends the step
        self._start_step: int | None = None  # the global step when the step's first micro-batch started

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, list) else v for k, v in self.state.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = {**self.state, **state_dict}

    # -- installation --------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        self._trainer = trainer
        self._reset_step()
        norm = nn.modules.batchnorm._NormBase  # noqa: SLF001 - BatchNorm and the InstanceNorms that track statistics
        self._norm_layers = [m for m in pl_module.modules() if isinstance(m, norm)]
        for optimizer in trainer.optimizers:
            zero, top = _engine_and_user_optimizer(optimizer)
            self._zero = self._zero or zero  # DeepSpeed holds one optimizer
            if zero is not None and hasattr(zero, "check_grad_overflow"):
                zero.check_grad_overflow = True  # DeepSpeed's own skip on a non-finite gradient norm, also in bf16
            needs = _needs_closure(top)
            if needs:
                rank_zero_warn(f"NonFiniteGuard: {needs} evaluates the closure itself, so its steps are not guarded "
                               "(CrAM: the callback lightning_ext.callbacks.CrAM runs both passes itself and is)")
                continue
            self._install(top)

    def _install(self, top: torch.optim.Optimizer) -> None:
        original = top.step  # an LR scheduler's wrapper, when one is there
        guard = self

        @functools.wraps(original)
        def step(closure=None, **kwargs: Any):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if guard._skips(top):
                top.zero_grad(set_to_none=True)
                return loss
            out = original(**kwargs)
            return loss if out is None else out

        self._installed.append((top, top.__dict__.get("step")))
        top.step = step

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for top, own in self._installed:
            if own is None:
                top.__dict__.pop("step", None)
            else:
                top.step = own
        self._installed, self._zero, self._norm_layers = [], None, []
        self._reset_step()

    # -- per micro-batch -----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.enabled and self._norms is None:  # the step's first micro-batch: before its forward
            self._norms = running_stats(self._norm_layers)
            self._start_step = trainer.global_step

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.enabled:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if not self.enabled or self._zero is None:
            return
        # DeepSpeed: Lightning steps the engine after every micro-batch; the step happens at its boundary, where
        # the loss verdict is taken (for every param group the engine steps); the gradients are the engine's
        engine = trainer.strategy.model
        if engine.is_gradient_accumulation_boundary():
            self._boundary = True
            self._verdict = (self._all_ranks(self._loss_flag(), torch.zeros(()))[0], False)

    def _skips(self, top: torch.optim.Optimizer) -> bool:
        """In the optimizer's ``step``: whether to skip it, on every rank alike. Under DeepSpeed the verdict was
        taken at the accumulation boundary (the engine calls ``step`` once per param group); elsewhere each call
        checks the loss and the gradients it is about to apply (manual optimization may step several
        optimizers in one batch)."""
        if self._boundary:
            return any(self._verdict or ())
        verdict = self._all_ranks(self._loss_flag(), _grads_not_finite(top))
        previous = self._verdict or (False, False)
        self._verdict = (previous[0] or verdict[0], previous[1] or verdict[1])
        return any(verdict)

    def _loss_flag(self) -> torch.Tensor:
        return self._bad_loss if self._bad_loss is not None else torch.zeros((), dtype=torch.bool)

    def _all_ranks(self, loss: torch.Tensor, grads: torch.Tensor) -> tuple[bool, bool]:
        device = self._trainer.strategy.root_device if self._trainer is not None else loss.device
        flags = torch.stack([loss.to(device).float(), grads.to(device).float()])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        loss_bad, grads_bad = (bool(v) for v in flags.tolist())  # the one host sync of the step
        return loss_bad, grads_bad

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.enabled:
            return
        zero = self._zero
        if zero is not None:
            if not self._boundary:
                return  # a micro-batch inside the engine's accumulation
            loss_bad, _ = self._verdict or (False, False)
            # the engine's own skip; under fp16 an overflow is its loss scaler's business, as with the GradScaler
            grads_bad = bool(getattr(zero, "overflow", False)) and not str(trainer.precision).startswith("16")
            verdict = (loss_bad, grads_bad)
        elif self._verdict is not None:
            verdict = self._verdict
        elif trainer.global_step == self._start_step:
            return  # inside Lightning's accumulation: the step has not come yet
        elif self._installed:  # no guarded step ran: the GradScaler skipped it (counted when a loss was bad)
            verdict = (self._all_ranks(self._loss_flag(), torch.zeros(()))[0], False)
        else:  # nothing is guarded (an optimizer that evaluates the closure itself)
            verdict = (False, False)
        if any(verdict):
            self._skipped(trainer, pl_module, verdict)
        else:
            self.state["consecutive"] = 0
        if self.state["skipped"]:
            pl_module.log("nonfinite/skipped_steps", float(self.state["skipped"]), on_step=True, on_epoch=False,
                          batch_size=1, rank_zero_only=True)
        self._reset_step()

    def _skipped(self, trainer: pl.Trainer, pl_module: pl.LightningModule, verdict: tuple[bool, bool]) -> None:
        restore_running_stats(self._norms or [])
        for optimizer in trainer.optimizers:
            for member in _stack(_engine_and_user_optimizer(optimizer)[1]):
                discard = getattr(member, "discard_step", None)
                if discard is not None:
                    discard()
        step = trainer.global_step - 1
        what = " and ".join(w for w, bad in zip(("loss", "gradients"), verdict) if bad)
        self.state["skipped"] += 1
        self.state["consecutive"] += 1
        self.state["last"] = [*self.state["last"], step][-self.max_consecutive if self.max_consecutive else -10:]
        rank_zero_warn(f"NonFiniteGuard: skipped the optimizer step of global step {step}: non-finite {what} "
                       f"({self.state['consecutive']} in a row, {self.state['skipped']} in all). Weights, optimizer "
                       "state and technique state are as before it.")
        if self.max_consecutive is not None and self.state["consecutive"] >= self.max_consecutive:
            raise RuntimeError(
                f"NonFiniteGuard: {self.state['consecutive']} optimizer steps in a row had a non-finite loss or "
                f"gradients (global steps {self.state['last']}); stopping. The weights are those of before the "
                "first of them, finite. Look for a bad batch, a learning rate too high or an fp16 overflow; "
                "NonFiniteGuard(max_consecutive=None) trains on regardless.")


def ensure_guard(trainer: pl.Trainer) -> None:
    """Add a :class:`NonFiniteGuard` to ``trainer`` unless it has one, enabled or not (idempotent; called from
    ``setup`` hooks and the CLI)."""
    if not any(isinstance(cb, NonFiniteGuard) for cb in trainer.callbacks):
        trainer.callbacks.append(NonFiniteGuard())


# -- helpers ----------------------------------------------------------------------------------------------
def _engine_and_user_optimizer(optimizer: Any) -> tuple[Any, torch.optim.Optimizer]:
    """(DeepSpeed's ZeRO optimizer or None, the user's outermost optimizer) behind what the trainer holds."""
    zero = None
    for _ in range(4):
        module = type(optimizer).__module__
        if module.startswith("deepspeed."):
            zero, optimizer = optimizer, optimizer.optimizer
        elif module.startswith("lightning.") and hasattr(optimizer, "_optimizer"):
            optimizer = optimizer._optimizer  # noqa: SLF001 - LightningOptimizer
        else:
            break
    return zero, optimizer


def _stack(optimizer: Any) -> list[Any]:
    """The optimizer and every optimizer it wraps (``WrapperOptimizer.base``), outermost first."""
    members = []
    while optimizer is not None and len(members) < 8:
        members.append(optimizer)
        optimizer = getattr(optimizer, "base", None)
    return members


def _needs_closure(optimizer: Any) -> str | None:
    for member in _stack(optimizer):
        if isinstance(member, torch.optim.LBFGS) or getattr(member, "driven", True) is False:
            return type(member).__name__
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") and callable(t.to_local) else t


def _grads_not_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Whether a gradient this rank's optimizer is about to apply holds a NaN or an infinity (a device flag)."""
    grads = [_local(p.grad) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.zeros((), dtype=torch.bool)
    largest = torch._foreach_norm(grads, float("inf"))  # NaN and inf propagate through the max
    return ~torch.stack([m.float().to(largest[0].device) for m in largest]).isfinite().all()
