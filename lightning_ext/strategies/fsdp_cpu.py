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
   ``fully_shard`` itself. Here, when the module does not, :func:`shard` does it after the techniques' surgery
   (which runs in the callbacks' ``setup``): ``fully_shard`` on every module whose class is named in
   ``shard_modules`` (innermost first), then on the root. A module that overrides ``configure_model`` keeps
   full control.

   The default, ``shard_modules=None``, shards the root only: one FSDP2 group, all-gathered for the whole
   forward and backward and resharded between steps — parameters, gradients and optimizer state are sharded
   where the optimizer sees them, but the forward holds the full model. That default is the one that is always
   correct: a technique's layer may read weights of a module other than itself in its forward (Bone's ``bat``
   mode reads its base layer's weight, LoTR's layers share one core), and a module sharded on its own is a
   sharded DTensor outside its own forward. Name the block class (``shard_modules: [BertLayer]``) to
   all-gather one block at a time, as FSDP's ``auto_wrap_policy`` does.
2. Data parallel over every process (``data_parallel_size`` = world size, ``tensor_parallel_size`` = 1) instead of
   Lightning's defaults (data parallel across nodes, tensor parallel within one), which need a GPU mesh.
3. The process-group backend defaults to ``gloo``.

Checkpoints: Lightning's default for this strategy, a distributed checkpoint (a folder, one shard per rank);
``save_distributed_checkpoint=False`` writes one full file on rank 0.

Registered name: ``fsdp_cpu`` (``trainer.strategy: fsdp_cpu`` with ``accelerator: cpu``; an example is
``configs/fsdp_cpu.yaml``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_ext._checks import check_bool, check_names

__all__ = ["FSDPCPUStrategy", "shard"]


def shard(module: torch.nn.Module, mesh, shard_modules: Sequence[str] | None = None,
          reshard_after_forward: bool = True) -> torch.nn.Module:
    """``fully_shard`` every submodule whose class name is in ``shard_modules`` (innermost first), then ``module``
    itself (see the module docstring for the choice). A name that matches no submodule is refused, listing the
    classes that exist."""
    from torch.distributed.fsdp import fully_shard

    names = list(shard_modules or [])
    chosen = [m for m in module.modules() if m is not module and type(m).__name__ in names]
    present = {type(m).__name__ for m in chosen}
    missing = [n for n in names if n not in present]
    if missing:
        classes = sorted({type(m).__name__ for m in module.modules() if m is not module})
        raise ValueError(f"shard_modules: no submodule of class {missing} in {type(module).__name__}; its module "
                         f"classes are {classes}")
    for child in reversed(chosen):  # innermost first, as fully_shard composes
        fully_shard(child, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return module


class FSDPCPUStrategy(ModelParallelStrategy):
    strategy_name = "fsdp_cpu"

    """FSDP2 on CPU (see the module docstring).

    Args:
        shard_modules: class names of the submodules to shard as their own FSDP2 group (e.g. a transformer
            block); ``None``: the root only.
        reshard_after_forward: free the gathered parameters after each group's forward (FSDP2's option).
        save_distributed_checkpoint: one shard per rank in a checkpoint folder (``True``) or one full file.
        process_group_backend: ``"gloo"`` by default.
    """

    def __init__(self, *, shard_modules: Sequence[str] | None = None, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: str | None = "gloo",
                 **kwargs: Any) -> None:
        check_bool("reshard_after_forward", reshard_after_forward)
        if isinstance(shard_modules, str):
            raise ValueError(f"shard_modules must be a list of module class names, got the string {shard_modules!r}")
        check_names("shard_modules", shard_modules, optional=True)
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.shard_modules = None if shard_modules is None else list(shard_modules)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        module = self.lightning_module
        if module is not None and not is_overridden("configure_model", module):
            shard(module, self.device_mesh["data_parallel"], self.shard_modules, self.reshard_after_forward)
            # ModelParallelStrategy.setup insists on an overridden configure_model; the module is sharded now
            module.configure_model = lambda: None
        super().setup(trainer)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="FSDP2 (fully_shard) on CPU (gloo)",
                                   override=True)


FSDPCPUStrategy.register_strategies(StrategyRegistry)
