"""One answer, for the whole package, to "which strategy is this trainer running, and how is it sharded?".

Every technique that refuses or adapts to a strategy asks :func:`strategy_info` — never ``type(...).__name__``
or the strategy's private config. DeepSpeed's ZeRO stage is read from the strategy's resolved config
(``zero_optimization.stage``, 0 when absent); FSDP is Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy`
(any sharding strategy, ``NO_SHARD`` included: it still wraps the module and flattens parameters) or its
:class:`~lightning.pytorch.strategies.ModelParallelStrategy` (FSDP2, :class:`~lightning_ext.strategies.FSDPCPUStrategy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)

__all__ = ["StrategyInfo", "strategy_info"]


@dataclass(frozen=True)
class StrategyInfo:
    #: ``"deepspeed"``, ``"fsdp"``, ``"ddp"`` (any DDP flavour), ``"single"`` (one device) or the class name
    kind: str
    #: DeepSpeed's ZeRO stage (0–3); ``None`` for every other strategy
    zero_stage: int | None = None

    @property
    def is_deepspeed(self) -> bool:
        return self.kind == "deepspeed"

    @property
    def is_fsdp(self) -> bool:
        return self.kind == "fsdp"

    @property
    def shards_parameters(self) -> bool:
        """Parameters live as partitions outside their module's forward (ZeRO-3, FSDP)."""
        return self.is_fsdp or self.zero_stage == 3

    def __str__(self) -> str:
        if self.is_deepspeed:
            return f"DeepSpeed ZeRO stage {self.zero_stage}"
        return {"fsdp": "FSDP", "ddp": "DDP", "single": "a single device"}.get(self.kind, self.kind)


def strategy_info(trainer_or_strategy: pl.Trainer | Strategy) -> StrategyInfo:
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    if isinstance(strategy, DeepSpeedStrategy):
        config = strategy.config or {}
        return StrategyInfo("deepspeed", int(config.get("zero_optimization", {}).get("stage", 0)))
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):  # FSDP1, FSDP2 (fsdp_cpu included)
        return StrategyInfo("fsdp")
    if isinstance(strategy, DDPStrategy):
        return StrategyInfo("ddp")
    if isinstance(strategy, SingleDeviceStrategy):
        return StrategyInfo("single")
    return StrategyInfo(type(strategy).__name__)
