"""The shared shell of the per-tensor optimizers (AdamP, SGDP, FAdam), in torch.optim's layering.

``step`` runs the closure; on DeepSpeed ZeRO-1/2/3's flat partitions and on FSDP2's dim-0 DTensor shards it runs the
subclass's sharded update (exact statistics, :mod:`.shard_layout`), on other flat 1-D partitions it refuses (see
:mod:`._sharding`);
and for each param group gathers the parameters with gradients and their state lists
(``_init_group``, creating state on first use), then calls the subclass's functional update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch.optim import Optimizer

from lightning_ext._checks import check_bool
from lightning_ext.optimizers import _fused_cpu
from lightning_ext.optimizers._fused_cpu import check_fused_params
from lightning_ext.optimizers._sharding import (
    check_full_shapes,
    deepspeed_zero3_caller,
    deepspeed_zero12_caller,
    dtensor_params,
    had_matrices,
)
from lightning_ext.optimizers._wrapper import evaluate_closure


def _check_betas(betas: Any) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas)
    if not ok:
        raise ValueError(f"betas must be a pair (beta1, beta2) of numbers in [0, 1), got {betas!r}")


def _check_flags(**flags: Any) -> None:
    """``nesterov``-style switches are True/False; ``foreach``/``fused`` also take None (torch.optim's default)."""
    for name, value in flags.items():
        check_bool(name, value, optional=name in ("foreach", "fused"))


def _bump_versions(*tensor_lists: list[torch.Tensor]) -> None:
    """The C++ kernels write through data pointers: tell autograd the tensors changed, as ATen's
    in-place ops do (a graph that saved one of them then errors instead of using stale values)."""
    for tensors in tensor_lists:
        torch.autograd.graph.increment_version(tensors)


def _use_foreach(foreach: bool | None, params: list[torch.Tensor]) -> bool:
    """Default as torch.optim: foreach on CUDA only. On CPU the multi-tensor kernels are loops that
    allocate a temporary per op, and the single-tensor path (cache-friendlier) is faster."""
    if foreach is not None:
        return foreach
    return len(params) > 1 and all(p.device.type == "cuda" for p in params)


def _cat_local(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The local shards of DTensors, flattened and concatenated (a copy)."""
    return torch.cat([t.to_local().reshape(-1) for t in tensors])


def _split_local_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Write ``flat`` back into the local shards it was concatenated from."""
    at = 0
    for t in tensors:
        local = t.to_local()
        local.view(-1).copy_(flat[at:at + local.numel()])
        at += local.numel()


def resolve_fused(group: dict, params: list[torch.Tensor]) -> bool:
    """Whether this step of ``group`` takes the fused C++ kernels. ``fused=None`` (the default) means the fastest
    available path, as ``foreach=None`` does in torch.optim: the fused step when every parameter is a plain
    contiguous float32/float64 CPU tensor, no path was asked for (``foreach`` left ``None``: ``foreach=False``
    still means the single-tensor path) and the kernels build (else one log line, and ``foreach``'s choice)."""
    fused = group.get("fused")
    if fused is not None:
        return fused
    if group.get("foreach") is not None or not all(_fused_cpu.fusable(p) for p in params):
        return False
    return _fused_cpu.optional_extension() is not None


class PerTensorOptimizer(Optimizer):
    #: state key -> factory(param) creating the state tensor on first use
    state_factories: ClassVar[dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {}
    #: what needs full-shape tensors, for the flat-partition refusal message
    needs_full_shapes_for: ClassVar[str] = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        if defaults.get("fused") and defaults.get("foreach"):
            raise ValueError("fused=True and foreach=True cannot both be set")
        super().__init__(params, defaults)
        if any(group.get("fused") for group in self.param_groups):
            check_fused_params(type(self).__name__, [g for g in self.param_groups if g.get("fused")])
        self._had_matrices = had_matrices(self.param_groups)

    def _init_group(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[str, list]]:
        params, grads = [], []
        states: dict[str, list[torch.Tensor]] = {key: [] for key in self.state_factories}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            state = self.state[p]
            if not state:
                for key, factory in self.state_factories.items():
                    state[key] = factory(p)
            params.append(p)
            grads.append(p.grad)
            for key in self.state_factories:
                states[key].append(state[key])
        return params, grads, states

    def _update(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor],
                states: dict[str, list[torch.Tensor]]) -> None:
        raise NotImplementedError

    def _sharded_update(self, group: dict, layout: Any, p: torch.Tensor, g: torch.Tensor, state: dict,
                        reduce: Callable[[torch.Tensor], None]) -> None:
        """The step on one flat partition (``layout`` says what it holds); ``reduce`` sums a statistics tensor
        over the ranks in place. Subclasses that implement it train under DeepSpeed ZeRO-1/2/3."""
        raise NotImplementedError

    def _step_on_partitions(self, zero: Any) -> None:
        from lightning_ext.optimizers import _sharding

        layouts = self.__dict__.setdefault("_shard_layouts", {})
        for index, group in enumerate(self.param_groups):
            if not group["params"]:  # ZeRO-3 steps one sub-group per call; the other groups are empty then
                continue
            (flat,) = group["params"]
            if id(flat) not in layouts:
                _, _, layout, process_group = _sharding.deepspeed_partition(zero, index, flat, type(self).__name__)
                layouts[id(flat)] = layout, process_group
            layout, process_group = layouts[id(flat)]
            params, grads, states = self._init_group(group)
            if not params:
                raise RuntimeError(f"{type(self).__name__}: the fp32 partition of group {index} has no gradient")
            self._sharded_update(group, layout, params[0], grads[0], self.state[params[0]],
                                 lambda t, pg=process_group: _sharding.all_reduce(t, pg))

    def _step_on_dtensors(self) -> None:
        """FSDP2: each param group's local dim-0 shards are concatenated into one flat tensor (parameters,
        gradients and state alike), stepped by the subclass's sharded update (one all-reduce per statistic round
        for the whole group) and written back. The state stays one DTensor per parameter, as FSDP2's
        checkpointing expects; the price is a copy of parameters and state in and out of the flat buffers."""
        from lightning_ext.optimizers import _sharding

        layouts = self.__dict__.setdefault("_dtensor_layouts", {})
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if not params:
                continue
            key = tuple(id(p) for p in params)
            if key not in layouts:
                layouts[key] = _sharding.dtensor_partition(params, type(self).__name__)
            layout, process_group = layouts[key]
            flat = {k: v[0] if v[0].dim() == 0 and not hasattr(v[0], "to_local") else _cat_local(v)
                    for k, v in states.items()}
            p, g = _cat_local(params), _cat_local(grads)
            self._sharded_update(group, layout, p, g, flat, lambda t, pg=process_group: _sharding.all_reduce(t, pg))
            _split_local_(p, params)
            for k, tensors in states.items():
                if flat[k] is tensors[0]:  # a shared 0-d counter (the step), advanced on the first parameter's
                    for t in tensors[1:]:
                        t.copy_(flat[k])
                else:
                    _split_local_(flat[k], tensors)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        if type(self)._sharded_update is not PerTensorOptimizer._sharded_update and dtensor_params(self.param_groups):
            self._step_on_dtensors()  # FSDP2: exact statistics on the dim-0 shards
            return loss
        if self._had_matrices and not had_matrices(self.param_groups):
            zero = (deepspeed_zero12_caller() or deepspeed_zero3_caller()) \
                if type(self)._sharded_update is not PerTensorOptimizer._sharded_update else None
            if zero is not None:  # DeepSpeed ZeRO-1/2/3: exact statistics on the flat partitions
                self._step_on_partitions(zero)
                return loss
        check_full_shapes(self, self._had_matrices, self.needs_full_shapes_for)
        for group in self.param_groups:
            params, grads, states = self._init_group(group)
            if params:
                self._update(group, params, grads, states)
        return loss
