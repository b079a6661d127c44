r"""LAWN: "Logit Attenuating Weight Normalization" (Gupta, Ramanath, Shi, Ramachandran, Zhou, Zhou,
Keerthi; arXiv 2108.05839, 2021) as a wrapper around any optimizer.

LAWN keeps the logits from growing (and the training loss from collapsing to ~0) by constraining
the weight norms of the network's final homogeneous sub-network after a free phase:

.. code-block:: text

    S = constrained weights (e.g. the classifier head after the last normalisation layer)
    steps 1 .. free_steps:  the base optimizer, unconstrained
    then, at every step:    r_W = |W| recorded once (the norms reached by the free phase)
                            [project_grad: g_W <- g_W - <g_W, Ŵ> Ŵ]
                            base optimizer step
                            W <- r_W W / |W|         (constraint="sphere")
                            W <- W min(1, r_W / |W|) (constraint="ball")

**This is a reconstruction.** No reference code exists and only the paper's abstract could be
checked; every choice below is an option, and its default is ours:

* ``norm_scope``: ``"layer"`` (Frobenius norm per tensor, default) or ``"row"`` (per output row);
* ``constraint``: ``"sphere"`` (default) or ``"ball"``;
* ``project_grad``: project the gradient onto the sphere's tangent space before the base step
  (default off);
* ``free_steps``: length of the free phase, in optimizer steps (required: the paper's value is unknown).

Not offered: projecting the base optimizer's momentum, and switching weight decay off on S in the
constrained phase — put S in a param group without weight decay instead (under the sphere
constraint decoupled decay on S only rescales its step by 1/(1 - lr λ)).

Wrapper state follows timm's Lookahead: the wrapper shares ``param_groups`` and ``state`` with the
base optimizer; its step counter is a ``lawn_step`` entry of each param group and each radius a
``lawn_radius`` entry of the constrained tensor's per-parameter state, so a checkpoint's
optimizer layout is the base's. (A base that keeps no per-parameter state, e.g. SGD without
momentum, saves no radius; a resume then re-reads it from the weights, equal up to rounding.) The base is stepped without a closure (the wrapper evaluates it first), so closure-only
optimizers such as LBFGS are not supported.

Under DeepSpeed ZeRO the module's weights are not the fp32 master copy that the optimizer
updates, so re-scaling them would be overwritten. At ZeRO-1/2/3 the step therefore works on the fp32
partitions themselves: norms, radii and the gradient projection from per-row / per-tensor partial sums
(:mod:`.shard_layout`, one all-reduce per round), the rescale applied to the partition. Under FSDP2 the
constrained tensors are DTensors and the plain step runs on them (DTensor reductions are exact). Elsewhere
(another flattening wrapper) the step refuses when the constrained tensors are no longer in the param groups.
Under DeepSpeed the radii are not in the optimizer's checkpoint (DeepSpeed saves the base's state per flat
partition): :meth:`LAWN.partition_radii` gives them, and the callback saves them with its own state, so a resume
is bit-exact; the YAML ``optimizer:`` form (no callback) re-reads them from the weights at the first constrained
step after a resume, equal up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from lightning_ext._checks import check_bool, check_choice, check_int
from lightning_ext.optimizers._sharding import _deepspeed_caller
from lightning_ext.optimizers._wrapper import GroupCall, WrapperOptimizer, evaluate_closure

__all__ = ["LAWN", "LAWNHyperparameters", "LAWN_DEFAULTS"]

NORM_SCOPES = ("layer", "row")
CONSTRAINTS = ("sphere", "ball")


@dataclass(frozen=True)
class LAWNHyperparameters:
    """LAWN's hyper-parameters and their validation, written once: the optimizer (:class:`LAWN`), its
    LightningCLI form (:class:`lightning_ext.optimizers.cli.LAWN`) and the callback
    (:class:`lightning_ext.callbacks.LAWN`) take their defaults from :data:`LAWN_DEFAULTS` and validate by
    building one. ``free_steps`` has no default: how long the free phase lasts depends on the run."""

    free_steps: int
    norm_scope: str = "layer"
    constraint: str = "sphere"
    project_grad: bool = False

    def __post_init__(self) -> None:
        check_int("free_steps", self.free_steps, 0)
        check_choice("norm_scope", self.norm_scope, NORM_SCOPES)
        check_choice("constraint", self.constraint, CONSTRAINTS)
        check_bool("project_grad", self.project_grad)


LAWN_DEFAULTS = LAWNHyperparameters(free_steps=0)  # only the defaulted fields are read from it


def _norms(w: torch.Tensor, scope: str) -> torch.Tensor:
    if scope == "layer" or w.dim() < 2:
        return torch.linalg.vector_norm(w)
    return torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1).view([-1] + [1] * (w.dim() - 1))


class LAWN(WrapperOptimizer):
    """Wrap ``optimizer`` so that ``constrained`` tensors keep their norms after ``free_steps`` steps.

    Args:
        optimizer: any torch optimizer (its ``param_groups`` and ``state`` are shared).
        constrained: the tensors to constrain; each must be a parameter of ``optimizer``.
        free_steps: optimizer steps before the constraint starts (>= 0).
        norm_scope: ``"layer"`` or ``"row"``.
        constraint: ``"sphere"`` or ``"ball"``.
        project_grad: tangent-project the gradients of constrained tensors before each
            constrained step.
    """

    def __init__(self, optimizer: Optimizer, constrained: Iterable[torch.Tensor], free_steps: int,
                 norm_scope: str = LAWN_DEFAULTS.norm_scope, constraint: str = LAWN_DEFAULTS.constraint,
                 project_grad: bool = LAWN_DEFAULTS.project_grad) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.hyperparameters = LAWNHyperparameters(free_steps, norm_scope, constraint, project_grad)
        self.constrained = list(constrained)
        if not self.constrained:
            raise ValueError("constrained: no tensors given")
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [tuple(p.shape) for p in self.constrained if id(p) not in known]
        if missing:
            raise ValueError(f"constrained: tensors of shapes {missing} are not parameters of the wrapped optimizer")
        super().__init__(optimizer)
        self.free_steps, self.norm_scope, self.constraint = free_steps, norm_scope, constraint
        self.project_grad = project_grad
        self._radii: list[torch.Tensor] | None = None
        self._set_steps(0)

    def _set_steps(self, n: int) -> None:
        self._steps = n
        self.set_group_counter("lawn_step", n)

    def __repr__(self) -> str:
        return (f"LAWN({self.base!r}, constrained={len(self.constrained)} tensors, free_steps={self.free_steps}, "
                f"norm_scope={self.norm_scope!r}, constraint={self.constraint!r}, project_grad={self.project_grad})")

    @property
    def in_free_phase(self) -> bool:
        return self._steps < self.free_steps

    def radii(self) -> list[torch.Tensor] | None:
        """The recorded radius of each constrained tensor (``None`` during the free phase)."""
        return self._radii

    def diagnostics(self) -> dict[str, float | torch.Tensor]:
        """What a logger records each step: ``lawn/constrained`` (0 in the free phase, then 1) and, once
        constrained, ``lawn/radius_mean`` (a tensor: logging it costs no host sync)."""
        out: dict[str, float | torch.Tensor] = {"lawn/constrained": float(not self.in_free_phase)}
        if self._radii is not None:
            out["lawn/radius_mean"] = torch.stack([r.float().mean() for r in self._radii]).mean()
        return out

    def _check_not_flattened(self) -> None:
        known = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(p) not in known for p in self.constrained):
            raise RuntimeError(
                f"LAWN's constrained tensors are no longer parameters of the optimizer: it is running under "
                f"{_deepspeed_caller()}, whose fp32 master partitions would overwrite the re-scaled weights. "
                "Use DDP for LAWN.")

    def _on_partitions(self) -> bool:
        known = {id(p) for g in self.param_groups for p in g["params"]}
        return any(id(p) not in known for p in self.constrained)

    def _step_on_partitions(self, zero) -> None:
        """The step under DeepSpeed ZeRO-1/2/3: the norms (and the gradient projection) from per-row / per-tensor
        partial sums over each group's fp32 partition, one all-reduce per round, and the rescale applied to the
        partition itself — the fp32 master copy the engine all-gathers into the module next. ZeRO-3 calls this
        once per sub-group (the other groups empty); ZeRO-1/2 once per param group (``groups_stepped``); the step
        counts once, at the last."""
        self.__dict__.setdefault("_shard_cache", {})
        self.__dict__.setdefault("_group_radii", {})
        with self.groups_stepped() as call:  # ZeRO-1/2: one call per param group, which sits at call.positions
            self._step_partitions(zero, call)

    def _step_partitions(self, zero, call: GroupCall) -> None:
        from lightning_ext.optimizers import _sharding

        cache = self.__dict__["_shard_cache"]
        group_radii = self.__dict__["_group_radii"]
        groups = []
        for index, group in zip(call.positions, self.param_groups):
            if not group["params"]:
                continue
            (flat,) = group["params"]
            if id(flat) not in cache:
                cache[id(flat)] = self._partition(zero, index, flat)
            groups.append((flat, *cache[id(flat)]))
        constrained_phase = not self.in_free_phase
        first = constrained_phase and any(key not in group_radii for _, key, *_ in groups)
        if first or (constrained_phase and self.project_grad):
            for flat, key, members, layout, mask, pg in groups:
                grad = flat.grad if self.project_grad and flat.grad is not None else None
                stats = lawn_shard_partials(layout, flat, grad, norm_scope=self.norm_scope)
                _sharding.all_reduce(stats, pg)
                group_radii.setdefault(key, stats[0].sqrt())
                if grad is not None:
                    lawn_shard_project_grad_(layout, flat, grad, stats, norm_scope=self.norm_scope, constrained=mask)
            if first:
                self._radii = self._radii_of_constrained()
        elif constrained_phase and self._radii is None:  # radii restored from a checkpoint (partition_radii)
            self._radii = self._radii_of_constrained()
        self.base.step()
        stage3 = not hasattr(zero, "single_partition_of_fp32_groups")
        if (not stage3 and call.last) or (stage3 and any(key == len(zero.fp16_groups) - 1 for _, key, *_ in groups)):
            self._set_steps(self._steps + 1)
        if constrained_phase:
            for flat, key, members, layout, mask, pg in groups:
                stats = lawn_shard_partials(layout, flat, norm_scope=self.norm_scope)
                _sharding.all_reduce(stats, pg)
                lawn_shard_rescale_(layout, flat, group_radii[key], stats, norm_scope=self.norm_scope,
                                    constraint=self.constraint, constrained=mask)

    def partition_radii(self) -> dict[int, torch.Tensor]:
        """Under DeepSpeed: the recorded radii of every row (or tensor) of each fp32 partition's parameters, by
        partition key. They are norms summed over the ranks, so every rank holds the same values: a checkpoint
        written by one rank restores them on all (``lightning_ext.callbacks.LAWN`` saves them)."""
        return {key: radii.clone() for key, radii in self.__dict__.get("_group_radii", {}).items()}

    def load_partition_radii(self, radii: dict[int, torch.Tensor]) -> None:
        """Restore :meth:`partition_radii` (then the first constrained step after a resume does not re-read them
        from the weights, which would equal them only up to rounding)."""
        self.__dict__["_group_radii"] = {int(key): value.clone() for key, value in radii.items()}
        self._radii = None

    def _partition(self, zero, index: int, flat: torch.Tensor):
        """(key, member parameter ids, layout, constrained mask, process group) of a flat fp32 partition (see
        :func:`._sharding.deepspeed_partition`)."""
        from lightning_ext.optimizers._sharding import deepspeed_partition

        key, members, layout, pg = deepspeed_partition(zero, index, flat, "LAWN")
        ours = {id(p) for p in self.constrained}
        mask = torch.tensor([id(p) in ours for p in members], device=flat.device)
        return key, [id(p) for p in members], layout, mask, pg

    def _radii_of_constrained(self) -> list[torch.Tensor] | None:
        """Each constrained tensor's radius (for ``radii()`` and the diagnostics), cut from its partition's;
        ``None`` until every partition holding a constrained tensor has recorded its radii."""
        out = []
        for p in self.constrained:
            for key, members, layout, *_ in self.__dict__["_shard_cache"].values():
                if id(p) in members and key in self._group_radii:
                    i = members.index(id(p))
                    start = layout.row_base[i] if self.norm_scope == "row" else i
                    count = layout.rows(i) if self.norm_scope == "row" else 1
                    out.append(self._group_radii[key][start:start + count])
                    break
            else:
                return None
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        if self._on_partitions():
            from lightning_ext.optimizers._sharding import deepspeed_zero3_caller, deepspeed_zero12_caller

            zero = deepspeed_zero12_caller() or deepspeed_zero3_caller()
            if zero is not None:
                self._step_on_partitions(zero)
                return loss
        self._check_not_flattened()
        constrained_phase = not self.in_free_phase
        if constrained_phase:
            if self._radii is None:  # first constrained step: the norms reached by the free phase
                self._radii = [_norms(p, self.norm_scope).clone() for p in self.constrained]
            if self.project_grad:
                for p in self.constrained:
                    if p.grad is not None:
                        unit = p / _norms(p, self.norm_scope).clamp_min(1e-30)
                        dims = tuple(range(1, p.dim())) if self.norm_scope == "row" and p.dim() > 1 else None
                        dot = (p.grad * unit).sum(dim=dims, keepdim=dims is not None)
                        p.grad.sub_(unit * dot)
        self.base.step()
        self._set_steps(self._steps + 1)
        if constrained_phase:
            for p, r in zip(self.constrained, self._radii):
                scale = r / _norms(p, self.norm_scope).clamp_min(1e-30)
                if self.constraint == "ball":
                    scale = scale.clamp_max(1.0)
                p.mul_(scale)
                if self.state[p]:  # never create a base's state entry: its lazy init tests for an empty dict
                    self.state[p]["lawn_radius"] = r
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._set_steps(int(self.param_groups[0].get("lawn_step", 0)))
        if self.in_free_phase or self._on_partitions():
            # DeepSpeed: the constrained tensors are the module's (partitioned under ZeRO-3) parameters, not the
            # optimizer's; the radii are re-read from the fp32 partitions at the first constrained step
            self._radii = None
        else:
            self._radii = [self.state[p]["lawn_radius"] if "lawn_radius" in self.state[p]
                           else _norms(p, self.norm_scope).clone() for p in self.constrained]


# -- on shards: one rank's flat local partition (see shard_layout.py) -------------------------------------------
# A constrained step under sharding: partials of |W|² (and <g, W> with project_grad) -> one all-reduce -> project
# the local gradient -> the base optimizer's (elementwise) step on the local partition -> partials of |W|² ->
# one all-reduce -> rescale the local elements. The radii are the first constrained step's summed norms.
def lawn_shard_partials(layout, w: torch.Tensor, g: torch.Tensor | None = None, *, norm_scope: str) -> torch.Tensor:
    """This rank's partial sums of ``w²`` (and ``g·w``), per row (``norm_scope="row"``) or per tensor, in the
    layout's fixed order: ``[1 or 2, rows or tensors]``."""
    from lightning_ext.optimizers.shard_layout import param_dots, row_dots

    pairs = [(w, w)] if g is None else [(w, w), (g, w)]
    return row_dots(layout, pairs) if norm_scope == "row" else param_dots(layout, pairs)


def _spread(layout, values: torch.Tensor, norm_scope: str, constrained: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-row / per-tensor values on the local elements of constrained tensors (``fill`` elsewhere)."""
    from lightning_ext.optimizers.shard_layout import per_element, per_row_element

    full = torch.full((), fill, dtype=values.dtype, device=values.device)
    if norm_scope == "row":
        return per_row_element(layout, torch.where(constrained[layout.param_of_row(values.device)], values, full),
                               fill)
    return per_element(layout, torch.where(constrained, values, full), fill)


def lawn_shard_project_grad_(layout, w: torch.Tensor, g: torch.Tensor, stats: torch.Tensor, *, norm_scope: str,
                             constrained: torch.Tensor) -> None:
    """``g -= <g, Ŵ> Ŵ`` per row / tensor of the constrained tensors, from the summed ``[w², g·w]``."""
    coef = stats[1] / stats[0].sqrt().clamp_min(1e-30).square()
    g.sub_(w * _spread(layout, coef, norm_scope, constrained, 0.0))


def lawn_shard_rescale_(layout, w: torch.Tensor, radii: torch.Tensor, stats: torch.Tensor, *, norm_scope: str,
                        constraint: str, constrained: torch.Tensor) -> None:
    """Put each constrained row / tensor back on its radius (``sphere``) or inside it (``ball``), from the summed
    ``w²`` after the base step; ``radii`` are the recorded norms, in the same order."""
    scale = radii / stats[0].sqrt().clamp_min(1e-30)
    if constraint == "ball":
        scale = scale.clamp_max(1.0)
    w.mul_(_spread(layout, scale, norm_scope, constrained, 1.0))
