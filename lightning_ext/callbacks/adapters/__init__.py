"""The peft adapter callbacks, one file per method: :mod:`.lora`, :mod:`.eva`, :mod:`.gora`, :mod:`.bone`,
:mod:`.lotr`; the glue they share is :mod:`._base`."""

from lightning_ext.callbacks.adapters._base import PeftAdapter, adapter_attribute, calibration_batches
from lightning_ext.callbacks.adapters.bone import Bone
from lightning_ext.callbacks.adapters.eva import EVA
from lightning_ext.callbacks.adapters.gora import GoRA
from lightning_ext.callbacks.adapters.lora import LoRA
from lightning_ext.callbacks.adapters.lotr import LoTR

__all__ = ["EVA", "Bone", "GoRA", "LoRA", "LoTR", "PeftAdapter", "adapter_attribute", "calibration_batches"]
