"""How a layer with a fused C++ CPU path (QuEST, OneBit) picks it: ``fused=None`` takes it wherever it runs and
otherwise falls back to the eager path with one log line per distinct reason; ``fused=True`` raises instead;
``fused=False`` is the eager reference. The extensions themselves are built by :mod:`lightning_ext._cpp_build`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType

import torch

from lightning_ext._cpp_build import KERNEL_DTYPES

log = logging.getLogger(__name__)


class FusedPath:
    """The fused path of one technique: ``name`` (for messages), ``build`` (returns the extension or raises a
    ``RuntimeError`` that says what is missing)."""

    def __init__(self, name: str, build: Callable[[], ModuleType]) -> None:
        self.name, self._build = name, build

    @functools.cached_property
    def _built(self) -> tuple[ModuleType | None, str | None]:
        try:
            return self._build(), None
        except RuntimeError as err:
            return None, str(err)

    @property
    def extension(self) -> ModuleType:
        ext, err = self._built
        if ext is None:
            raise RuntimeError(err)
        return ext

    def unsupported(self, t: torch.Tensor) -> str | None:
        """Why the kernels cannot take ``t`` (``None``: they can; builds the extension on first call)."""
        if t.device.type != "cpu":
            return f"the fused {self.name} kernels run on CPU tensors; this one is on {t.device}"
        if t.dtype not in KERNEL_DTYPES:
            return f"the fused {self.name} kernels take float32/float64 tensors; this one is {t.dtype}"
        return self._built[1]

    def use(self, fused: bool | None, *tensors: torch.Tensor) -> bool:
        """The path to take for ``tensors`` (see the module docstring)."""
        if fused is False:
            return False
        for t in tensors:
            reason = self.unsupported(t)
            if reason is not None:
                if fused:
                    raise RuntimeError(f"{self.name}(fused=True): {reason}. Use fused=None (fall back where needed) "
                                       "or fused=False.")
                self.say_fallback_once(reason)
                return False
        return True

    @functools.cache  # noqa: B019 (one instance per technique, alive as long as the module)
    def say_fallback_once(self, reason: str) -> None:
        log.warning("lightning_ext %s: %s; the eager path runs instead (same math, slower). Pass fused=False to "
                    "choose it and silence this line.", self.name, reason)
