"""DeepSpeed ZeRO 1–3 through Lightning on CPU (gloo): debug a ZeRO setup on a laptop.

Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` refuses any accelerator
but CUDA, although DeepSpeed itself runs on CPU (its CPU accelerator, gloo collectives). This
subclass changes four things:

1. ``setup_environment`` skips the CUDA-only check and runs the DDP one;
2. the process-group backend defaults to ``gloo``;
3. CPU devices get explicit indices (``cpu`` -> ``cpu:i``) so Lightning's check that device
   indices equal local ranks passes;
4. the ZeRO communication buckets default to 5e6 elements (20 MB) instead of Lightning's GPU
   default of 2e8 (800 MB): on CPU, allocating and zeroing 800 MB buckets made a 30-step ZeRO-2
   run of a small MLP take 97 s instead of 22 s (mostly kernel time in page faults).

It also fixes one bug of Lightning's strategy (on any accelerator): with ``accumulate_grad_batches=N > 1``
Lightning divides each micro-batch's loss by ``N`` (its closure) and the DeepSpeed engine, configured by Lightning
with ``gradient_accumulation_steps=N``, divides it by ``N`` again in ``engine.backward``: every step's gradient
is ``1/N`` of the mean. AdamW nearly hides this (it is scale-invariant but for ``eps``); SGD, SGDP, LAWN's
and CrAM's steps do not. Here the engine's backward is called with ``scale_wrt_gas=False``, so the gradient of
N accumulated micro-batches is their mean, as without DeepSpeed (``tests/test_sharded_settings.py``).

One option is added: ``param_persistence_threshold`` (ZeRO-3's ``stage3_param_persistence_threshold``;
``None`` keeps DeepSpeed's default of 1e5 elements, below which a parameter stays whole on every rank). The
test harness passes 0, so that the small test models are partitioned as a large model's layers would be —
with the default, a ZeRO-3 test of a small model never sees a partitioned module parameter.

It touches Lightning internals, which is why ``lightning`` is pinned to its minor version and
``tests/test_deepspeed.py`` runs it. Registered names: ``deepspeed_cpu`` and
``deepspeed_cpu_stage_{1,2,3}`` (use them as ``trainer.strategy`` in YAML, with
``accelerator: cpu``). Pass a torch optimizer (DeepSpeed's own CPU Adam compiles for ≈45 s).
"""

from __future__ import annotations

import os
from typing import Any

import torch

if not torch.cuda.is_available():
    # Without this DeepSpeed's accelerator auto-detection prints a warning to *stdout* on import,
    # which corrupts `--print_config` output. An explicit user setting wins.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"
    #: the engine's backward does not divide by its gradient_accumulation_steps (Lightning's closure did already)
    engine_scales_loss = False

    def __init__(self, *args: Any, process_group_backend: str | None = "gloo",
                 reduce_bucket_size: float = 5e6, allgather_bucket_size: float = 5e6,
                 param_persistence_threshold: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, process_group_backend=process_group_backend, reduce_bucket_size=reduce_bucket_size,
                         allgather_bucket_size=allgather_bucket_size, **kwargs)
        if param_persistence_threshold is not None:
            if not isinstance(param_persistence_threshold, int) or param_persistence_threshold < 0:
                raise ValueError("param_persistence_threshold must be an int >= 0 or None, got "
                                 f"{param_persistence_threshold!r}")
            self.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = \
                param_persistence_threshold

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None:
            devices = [torch.device("cpu", i) if d.type == "cpu" else d for i, d in enumerate(devices)]
        self._parallel_devices = devices

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("scale_wrt_gas", False)  # the loss is divided by accumulate_grad_batches already
        return super().backward(closure_loss, optimizer, *args, **kwargs)

    def setup_environment(self) -> None:
        if self.accelerator is not None and type(self.accelerator).__name__ == "CUDAAccelerator":
            return super().setup_environment()
        DDPStrategy.setup_environment(self)

    @classmethod
    def register_strategies(cls, strategy_registry: _StrategyRegistryType) -> None:  # type: ignore[override]
        strategy_registry.register(cls.strategy_name, cls, description="DeepSpeed on CPU (gloo)", override=True)
        for stage in (1, 2, 3):
            strategy_registry.register(f"deepspeed_cpu_stage_{stage}", cls, override=True,
                                       description=f"DeepSpeed ZeRO stage {stage} on CPU (gloo)", stage=stage)


_StrategyRegistryType = type(StrategyRegistry)
DeepSpeedCPUStrategy.register_strategies(StrategyRegistry)
