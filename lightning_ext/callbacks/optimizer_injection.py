"""Wrap whatever a LightningModule's ``configure_optimizers`` returns (for optimizer-wrapper callbacks).

Done in ``setup``, so Lightning (and DeepSpeed's engine) receive the wrapped optimizer;
replacing ``trainer.optimizers`` after the fact is silently bypassed by DeepSpeed. Handles every
return form Lightning accepts: an optimizer, a list/tuple of optimizers, ``(optimizers,
schedulers)``, and ``{"optimizer": ..., "lr_scheduler": ...}`` dicts (schedulers are re-pointed at
the wrapper, which shares the base's ``param_groups``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer

Wrap = Callable[[Optimizer], Optimizer]


def _repoint_scheduler(entry: Any, old: Optimizer, new: Optimizer) -> None:
    scheduler = entry["scheduler"] if isinstance(entry, dict) else entry
    if getattr(scheduler, "optimizer", None) is old:
        scheduler.optimizer = new


def wrap_configured(out: Any, wrap: Wrap) -> Any:
    """Apply ``wrap`` to every optimizer in a ``configure_optimizers`` result."""
    if isinstance(out, Optimizer):
        return wrap(out)
    if isinstance(out, dict):
        out = dict(out)
        old = out["optimizer"]
        out["optimizer"] = wrap(old)
        if "lr_scheduler" in out:
            _repoint_scheduler(out["lr_scheduler"], old, out["optimizer"])
        return out
    if isinstance(out, (list, tuple)):
        if len(out) == 2 and isinstance(out[0], (list, tuple)):  # (optimizers, schedulers)
            optimizers, schedulers = list(out[0]), list(out[1])
            wrapped = [wrap(o) for o in optimizers]
            for old, new in zip(optimizers, wrapped):
                for entry in schedulers:
                    _repoint_scheduler(entry, old, new)
            return wrapped, schedulers
        return [wrap_configured(o, wrap) for o in out]
    raise TypeError(f"cannot wrap the optimizers in a configure_optimizers result of type {type(out).__name__}")


_CHAIN = "_lightning_ext_optimizer_wraps"


def inject(pl_module: pl.LightningModule, wrap: Wrap, owner: object,
           after: Callable[[], None] | None = None) -> None:
    """Make ``pl_module.configure_optimizers`` return its optimizers wrapped by ``wrap`` (once per ``owner``,
    the injecting callback), until :func:`uninject`. Several owners stack in the order they inject (the first
    is innermost). The module's own method (or an instance-level one, e.g. LightningCLI's) stays untouched.
    ``after`` runs once every wrap has been applied (a check that raises, e.g. that something was wrapped)."""
    chain = pl_module.__dict__.get(_CHAIN)
    if chain is None:
        own = pl_module.__dict__.get("configure_optimizers")  # an instance-level method, to put back
        original = pl_module.configure_optimizers
        chain = pl_module.__dict__[_CHAIN] = {"own": own, "wraps": []}

        def configure_optimizers() -> Any:
            out = original()
            for _, each, _ in chain["wraps"]:
                out = wrap_configured(out, each)
            for _, _, after in chain["wraps"]:
                if after is not None:
                    after()
            return out

        pl_module.configure_optimizers = configure_optimizers
    if not any(o is owner for o, _, _ in chain["wraps"]):
        chain["wraps"].append((owner, wrap, after))


def uninject(pl_module: pl.LightningModule, owner: object) -> None:
    """Undo :func:`inject` for ``owner`` (called in the callback's ``teardown``): a module fitted again, with
    another Trainer and callback, is wrapped afresh — not twice, and not by a stale callback."""
    chain = pl_module.__dict__.get(_CHAIN)
    if chain is None:
        return
    chain["wraps"] = [entry for entry in chain["wraps"] if entry[0] is not owner]
    if not chain["wraps"]:
        del pl_module.__dict__[_CHAIN]
        if chain["own"] is None:
            del pl_module.__dict__["configure_optimizers"]
        else:
            pl_module.configure_optimizers = chain["own"]


def inject_wrapper(pl_module: pl.LightningModule, tensors: Callable[[], list],
                   make: Callable[[Optimizer, list], Optimizer], register: Callable[[Optimizer], None],
                   owner: object) -> None:
    """Wrap every optimizer that owns some of ``tensors()`` as ``make(optimizer, owned_tensors)`` and pass
    each wrapper to ``register``; optimizers owning none of them are returned unwrapped.

    ``tensors`` is called when the optimizers are configured, not at injection: a strategy that shards the
    module in between (FSDP2's ``fully_shard``) replaces its parameters with new (DTensor) ones."""

    wrapped_now: list[Optimizer] = []

    def wrap(optimizer: Optimizer) -> Optimizer:
        owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
        mine = [t for t in tensors() if id(t) in owned]
        if not mine:
            return optimizer
        wrapped = make(optimizer, mine)
        wrapped_now.append(wrapped)
        register(wrapped)
        return wrapped

    def check() -> None:
        """Never silently unwrapped: an optimizer must hold the tensors (another technique may have replaced
        them between this one's setup and ``configure_optimizers``)."""
        if not wrapped_now:
            raise RuntimeError(f"{type(owner).__name__}: no optimizer holds the tensors it acts on, so it would not "
                               "act at all. A technique set up after it may have replaced or reparameterized them, "
                               "or configure_optimizers leaves them out")
        wrapped_now.clear()

    inject(pl_module, wrap, owner, after=check)
