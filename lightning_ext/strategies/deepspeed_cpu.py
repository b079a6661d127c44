"""DeepSpeed ZeRO 1–3 through Lightning on CPU (gloo): debug a ZeRO setup on a laptop.

Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` refuses any accelerator
but CUDA, although DeepSpeed itself runs on CPU (its CPU accelerator, gloo collectives). This
subclass changes three things and nothing else:

1. ``setup_environment`` skips the CUDA-only check and runs the DDP one;
2. the process-group backend defaults to ``gloo``;
3. CPU devices get explicit indices (``cpu`` -> ``cpu:i``) so Lightning's check that device
   indices equal local ranks passes.

It touches Lightning internals, which is why ``lightning`` is pinned to its minor version and
``tests/test_deepspeed.py`` runs it. Registered names: ``deepspeed_cpu`` and
``deepspeed_cpu_stage_{1,2,3}`` (use them as ``trainer.strategy`` in YAML, with
``accelerator: cpu``). Pass a torch optimizer (DeepSpeed's own CPU Adam compiles for ≈45 s).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, process_group_backend: str | None = "gloo", **kwargs: Any) -> None:
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None:
            devices = [torch.device("cpu", i) if d.type == "cpu" else d for i, d in enumerate(devices)]
        self._parallel_devices = devices

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
