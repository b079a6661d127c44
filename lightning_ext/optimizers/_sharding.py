"""Refuse optimizers with per-tensor statistics when DeepSpeed hands them flat 1-D partitions.

DeepSpeed ZeRO stages 1–3 (and its BF16 optimizer) replace every param group's ``params`` in
the client optimizer with flat fp32 partitions after construction. An optimizer whose update
depends on tensor shape or per-tensor reductions (AdamP's projection, FAdam's RMS clips)
would silently compute something else there. Each such optimizer records at construction
whether it was given any tensor with ``ndim >= 2``; at ``step`` a group that now holds only
1-D tensors where there used to be matrices means a flattening wrapper, and the step raises.

The ZeRO stage is named in the message when the caller is one of DeepSpeed's ZeRO optimizers
(found by walking the caller frames — only on this error path).
"""

from __future__ import annotations

import inspect

import torch


def had_matrices(param_groups: list[dict]) -> bool:
    """Whether any parameter is a matrix — by its full shape: a ZeRO-3 parameter (built under ``zero.Init``, or
    after partitioning) reports shape ``(0,)`` and keeps the real one in ``ds_shape``."""
    return any(len(getattr(p, "ds_shape", p.shape)) >= 2 for g in param_groups for p in g["params"])


def _deepspeed_caller() -> str:
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            name = type(owner).__name__ if owner is not None else ""
            if name == "DeepSpeedZeroOptimizer_Stage3":
                return "DeepSpeed ZeRO stage 3"
            if name == "DeepSpeedZeroOptimizer":
                return f"DeepSpeed ZeRO stage {2 if getattr(owner, 'partition_gradients', False) else 1}"
            if name == "BF16_Optimizer":
                return "DeepSpeed's BF16 optimizer (ZeRO stage 1)"
            frame = frame.f_back
        return "a wrapper that flattens parameters (DeepSpeed ZeRO stage 1, 2 or 3, or its BF16 optimizer)"
    finally:
        del frame


def check_full_shapes(optimizer: torch.optim.Optimizer, expected: bool, what: str) -> None:
    """Raise if the optimizer was built with matrices but now sees only flat 1-D tensors."""
    if expected and not had_matrices(optimizer.param_groups):
        raise RuntimeError(
            f"{type(optimizer).__name__} needs full-shape parameters for {what}, but its param groups now hold only "
            f"flat 1-D partitions: it is running under {_deepspeed_caller()}, which would silently change the "
            "algorithm. Use DDP, or DeepSpeed without ZeRO partitioning (stage 0, fp32), for this optimizer.")


def _stepping(class_name: str, attribute: str):
    """The ``self`` of the nearest caller frame whose class is ``class_name`` and has ``attribute``, else None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if type(owner).__name__ == class_name and hasattr(owner, attribute):
                return owner
            frame = frame.f_back
        return None
    finally:
        del frame


def deepspeed_zero12_caller():
    """The DeepSpeed ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) that is stepping this optimizer, found by
    walking the caller frames; ``None`` under anything else (ZeRO-3 included). Called once per step, only when
    the param groups hold flat partitions."""
    return _stepping("DeepSpeedZeroOptimizer", "single_partition_of_fp32_groups")


def deepspeed_zero3_caller():
    """The DeepSpeed ZeRO-3 optimizer (``DeepSpeedZeroOptimizer_Stage3``) stepping this optimizer (it steps one
    sub-group per call, the other groups' ``params`` empty); ``None`` under anything else."""
    return _stepping("DeepSpeedZeroOptimizer_Stage3", "fp32_partitioned_groups_flat")


def deepspeed_partition(zero, index: int, flat: torch.Tensor, who: str) -> tuple[int, list, object, object]:
    """What the flat fp32 partition ``flat`` (param group ``index`` under ZeRO-3) is: ``(key, member parameters, layout,
    process group)``. ZeRO-1/2 keep one partition per param group (key: the group), ZeRO-3 one per sub-group
    (key: the sub-group); the statistics are reduced over the process group."""
    from lightning_ext.optimizers.shard_layout import ShardLayout

    if hasattr(zero, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        # found by identity: ZeRO-1/2 step one param group per call, handing the optimizer that group alone, so
        # the caller's position in its param_groups is 0 for every group
        index = next((i for i, t in enumerate(zero.single_partition_of_fp32_groups) if t is flat), None)
        if index is None:
            raise RuntimeError(f"{who}: a param group holds none of DeepSpeed's fp32 partitions")
        return (index, zero.bit16_groups[index], ShardLayout.from_deepspeed(zero, index),
                zero.real_dp_process_group[index])
    sub = next((i for i, t in enumerate(zero.fp32_partitioned_groups_flat) if t is flat), None)
    if sub is None:
        raise RuntimeError(f"{who}: param group {index} holds none of DeepSpeed ZeRO-3's fp32 sub-group partitions")
    return sub, zero.fp16_groups[sub], ShardLayout.from_deepspeed_zero3(zero, sub), zero.dp_process_group


def all_reduce(tensor: torch.Tensor, group) -> None:
    """The one collective per statistic round (a module attribute, so a test can replace it by a no-op: the
    shard-local negative control)."""
    torch.distributed.all_reduce(tensor, group=group)


def dtensor_params(param_groups: list[dict]) -> bool:
    """Whether the parameters are DTensors (FSDP2's ``fully_shard``; checked once per step)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for g in param_groups for p in g["params"])


def dtensor_partition(params: list, who: str):
    """``(layout, process group)`` of the local shards of FSDP2 DTensor parameters, concatenated in order: each
    must be sharded on dim 0 over one 1-D mesh (``torch.chunk`` sizes, :meth:`ShardLayout.dim0_shards`)."""
    from torch.distributed.tensor import Shard

    from lightning_ext.optimizers.shard_layout import ShardLayout

    mesh = params[0].device_mesh
    for p in params:
        if p.device_mesh != mesh or mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise RuntimeError(f"{who} under FSDP2 needs every parameter sharded on dim 0 over one 1-D device mesh "
                               f"(fully_shard's layout); got placements {tuple(p.placements)} on a {mesh.ndim}-D "
                               "mesh (tensor parallelism is not supported)")
    layout = ShardLayout.dim0_shards([p.shape for p in params], mesh.size(), mesh.get_local_rank())
    held = [s.length for s in layout.segments]
    local = [p.to_local().numel() for p in params if p.to_local().numel()]
    if held != local:
        raise RuntimeError(f"{who}: FSDP2's local shards hold {local} elements, dim-0 chunks of the full shapes "
                           f"{held}: the sharding is not torch.chunk on dim 0")
    return layout, mesh.get_group()
