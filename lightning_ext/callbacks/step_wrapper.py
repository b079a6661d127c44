"""Wrapping a LightningModule's ``training_step`` from a callback (loss reweighting, CLNP).

Lightning's ``on_before_backward`` sees the loss but cannot replace it, so a callback that changes the
loss installs a wrapper as an *instance* attribute in ``setup`` and removes it in ``teardown``. The
wrapper is looked up at call time by every strategy (``Strategy.training_step`` or DDP/DeepSpeed's
forward redirection), and wrappers installed this way compose: each wraps whatever is there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

StepFn = Callable[..., Any]


def wrap_training_step(pl_module: pl.LightningModule, wrap: Callable[[StepFn], StepFn]) -> StepFn:
    """Install ``wrap(current training_step)`` on the instance; returns the installed function."""
    installed = wrap(pl_module.training_step)
    pl_module.training_step = installed
    return installed


def unwrap_training_step(pl_module: pl.LightningModule, installed: StepFn) -> None:
    """Remove ``installed`` if it is still the instance's ``training_step`` (back to what was there)."""
    if pl_module.__dict__.get("training_step") is installed:
        del pl_module.training_step
