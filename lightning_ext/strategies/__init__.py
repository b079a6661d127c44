"""Strategies Lightning does not ship — DeepSpeed and FSDP2 on CPU (importing this module registers them) — and the probe
every technique asks which strategy it runs under (:func:`strategy_info`)."""

from lightning_ext.strategies.deepspeed_cpu import DeepSpeedCPUStrategy
from lightning_ext.strategies.fsdp_cpu import FSDPCPUStrategy
from lightning_ext.strategies.probe import StrategyInfo, strategy_info

__all__ = ["DeepSpeedCPUStrategy", "FSDPCPUStrategy", "StrategyInfo", "strategy_info"]
