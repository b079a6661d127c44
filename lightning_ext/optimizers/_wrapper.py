"""Base of optimizer wrappers (LAWN, CrAM), after timm's Lookahead.

The wrapper *shares* the base optimizer's ``param_groups`` (so LR schedulers and Lightning see
one set of groups) and its ``state`` (so the wrapper's own per-parameter entries ride in the
base's ``state_dict`` and a checkpoint's optimizer layout is the base's). ``Optimizer.__init__``
is not called — it would copy the groups — so the hook registries it would create are set here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch.optim import Optimizer


def evaluate_closure(closure):
    """``closure()`` with gradients enabled (optimizers' ``step`` runs under ``no_grad``); ``None`` if absent."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class WrapperOptimizer(Optimizer):
    def __init__(self, optimizer: Optimizer) -> None:  # noqa: super-init-not-called (see module docstring)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.base = optimizer
        self.defaults = optimizer.defaults
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state

    def set_group_counter(self, key: str, value: int) -> None:
        """A step counter kept in every param group (saved with the base's ``state_dict``)."""
        for group in self.base.param_groups:
            group[key] = value

    @contextlib.contextmanager
    def groups_stepped(self) -> Iterator[GroupCall]:
        """The param groups this ``step`` call is for: their positions in the base's list, and whether they close
        the step.

        DeepSpeed ZeRO-1/2 steps the client optimizer once per param group, with ``param_groups`` set to that one
        group for the call: on a wrapper that sets the wrapper's attribute, not the base's. Inside this context
        the base sees the same groups (so a call steps only them), and the wrapper learns where they sit (its
        once-per-step work belongs to the call that closes the step). Outside DeepSpeed: every group, at once."""
        groups, full = self.param_groups, self.base.param_groups
        if groups is full:
            yield GroupCall(list(range(len(full))), True)
            return
        positions = [i for i, g in enumerate(full) if any(g is h for h in groups)]
        self.base.param_groups = groups
        try:
            yield GroupCall(positions, positions[-1] == len(full) - 1)
        finally:
            self.base.param_groups = full


@dataclasses.dataclass(frozen=True)
class GroupCall:
    """What :meth:`WrapperOptimizer.groups_stepped` tells: the positions of the call's param groups in the base's
    list, and whether the call closes (``last``) the optimizer step."""

    positions: list[int]
    last: bool
