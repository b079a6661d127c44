"""Silence, for the command line only, messages from other libraries that a user of ``lightning-ext`` cannot act on.

Each filter matches one message by its text (and its logger or warning category), so nothing else is hidden; a
library that fixes the cause makes the filter a no-op. What each one is, and why the user cannot act on it:

* Lightning's model-summary and logger connectors print tips to install ``litlogger`` / ``litmodels`` (cloud
  services; nothing to do with the run).
* Lightning's ``utilities/_pytree.py`` calls ``isinstance(treespec, LeafSpec)``, deprecated in torch 2.13.
* peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates (a FutureWarning per fit).
* peft's EVA path suggests ``low_cpu_mem_usage=True`` for larger calibration batches; the EVA callback builds the
  model itself, so the suggestion is not the user's to take (and the demo batches are small).
* bitsandbytes logs, at import on AVX512-BF16 CPUs, that it could not load an optional kernel from the hub
  (``pip install kernels``, which downloads at run time).

Library use (``import lightning_ext`` in a user's script) installs none of these.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["quiet_outside_noise"]

_LOG_MESSAGES = {
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip: For seamless cloud",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}
_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"lora with eva initialization used with low_cpu_mem_usage=False", UserWarning),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_outside_noise() -> None:
    """Install the filters (idempotent)."""
    for logger_name, prefixes in _LOG_MESSAGES.items():
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for message, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
