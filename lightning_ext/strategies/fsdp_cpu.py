"""FSDP2 (``fully_shard``) through Lightning on CPU (gloo), without writing ``configure_model``.

Built on Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2 + DTensor), not on its
:class:`~lightning.pytorch.strategies.FSDPStrategy` (FSDP1), for two reasons:

* FSDP2 shards every parameter on dim 0 (``torch.chunk`` sizes, so a later rank may hold fewer rows or none):
  rows stay whole on one rank, and each parameter keeps its full shape as a DTensor. The shape-aware optimizers
  (AdamP/SGDP's per-row projection, FAdam's per-tensor clip, LAWN's per-layer norms) see what they are
  computing on. FSDP1 hands the optimizer 1-D views into flat parameters, shapes gone — the situation of
  DeepSpeed ZeRO that :mod:`lightning_ext.optimizers.shard_layout` exists to undo.
* FSDP2 is where PyTorch develops FSDP; FSDP1 is in maintenance.

What this subclass changes, and nothing else:

1. ``ModelParallelStrategy`` requires the LightningModule to override ``configure_model`` and call
   ``fully_shard`` itself. Here, when the module does not, :meth:`shard` does it: ``fully_shard`` on every
   submodule that directly holds parameters (after the techniques' surgery, which runs in the callbacks'
   ``setup``), then on the root. A module that overrides ``configure_model`` keeps full control.
2. Data parallel over every process (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1) instead of
   Lightning's defaults (data parallel across nodes, tensor parallel within one), which need a GPU mesh.
3. The process-group backend defaults to ``gloo``.

Checkpoints: Lightning's default for this strategy, a distributed checkpoint (a folder, one shard per rank);
``save_distributed_checkpoint=False`` writes one full file on rank 0.

Registered name: ``fsdp_cpu`` (``trainer.strategy: fsdp_cpu`` with ``accelerator: cpu``; an example is
``configs/fsdp_cpu.yaml``).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.model_helpers import is_overridden

__all__ = ["FSDPCPUStrategy", "shard"]


def shard(module: torch.nn.Module, mesh, reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every submodule that directly holds parameters (innermost first), then ``module`` itself.

    One FSDP2 group per parameter-holding module: each is all-gathered just before its own forward and resharded
    after it, so a layer's forward — the techniques' replaced layers included — sees its full weights."""
    from torch.distributed.fsdp import fully_shard

    holders = [m for m in module.modules() if m is not module and any(True for _ in m.parameters(recurse=False))]
    for child in reversed(holders):  # innermost first, as fully_shard composes
        fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module


class FSDPCPUStrategy(ModelParallelStrategy):
    strategy_name = "fsdp_cpu"

    def __init__(self, *, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = True,
                 process_group_backend: str | None = "gloo", **kwargs: Any) -> None:
        if not isinstance(reshard_after_forward, bool):
            raise ValueError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        module = self.lightning_module
        if module is not None and not is_overridden("configure_model", module):
            shard(module, self.device_mesh["data_parallel"], self.reshard_after_forward)
            # ModelParallelStrategy.setup insists on an overridden configure_model; the module is sharded now
            module.configure_model = lambda: None
        super().setup(trainer)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="FSDP2 (fully_shard) on CPU (gloo)",
                                   override=True)


FSDPCPUStrategy.register_strategies(StrategyRegistry)
