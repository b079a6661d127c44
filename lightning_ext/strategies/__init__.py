"""Strategies Lightning does not ship: DeepSpeed on CPU (importing this module registers them)."""

from lightning_ext.strategies.deepspeed_cpu import DeepSpeedCPUStrategy

__all__ = ["DeepSpeedCPUStrategy"]
