"""The fused CPU steps of AdamP, SGDP and FAdam (``fused=True``): a small C++ extension (built by
:mod:`lightning_ext._cpp_build`, which also builds the top-k selection kernel of ``nn.pruning``).

On CPU the eager paths run ~20 ATen kernels per tensor and torch's own foreach path is slower
than its single-tensor one; ``torch.compile`` of the same step measured 4-8x slower than torch's
fused AdamW on these machines (its row reductions do not fuse well on CPU). No library ships a
fused AdamP/FAdam, so ``csrc/fused_cpu.cpp`` does: two passes over memory per tensor, parallel
over rows, with the eager path's arithmetic (float64 results agree with it to rounding).

The extension is compiled with ``torch.utils.cpp_extension.load`` on first use (about a minute;
needs a C++ compiler and ``ninja``) and cached by torch under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``). Set ``LIGHTNING_EXT_VERBOSE_BUILD=1`` to see the build.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch

from lightning_ext import _cpp_build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
SUPPORTED_DTYPES = _cpp_build.KERNEL_DTYPES
# Reassociation lets the compiler vectorise the row sums (their order differs from ATen's anyway);
# no -ffinite-math-only, so NaN/inf behave as in the eager path. -march=native: the build is cached
# per machine (point TORCH_EXTENSIONS_DIR at a node-local folder on clusters with mixed CPUs).
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-fopenmp"]


def missing_build_requirement(source: Path | None = None) -> str | None:
    """What the build lacks (:func:`lightning_ext._cpp_build.missing_build_requirement`); ``source``: the
    optimizer kernels' by default."""
    return _cpp_build.missing_build_requirement(SOURCE if source is None else source)


@functools.cache
def extension() -> ModuleType:
    """Build (once per machine, about a minute) and load the fused optimizer kernels."""
    return _cpp_build.build("lightning_ext_fused_cpu", SOURCE, "the fused CPU optimizer kernels", CFLAGS,
                            "fused=False")


@functools.cache
def optional_extension() -> ModuleType | None:
    """The optimizer kernels for a path that uses them when it can (the default ``fused=None``), or ``None`` where
    they cannot be built: that path then runs eagerly (said once in the log)."""
    try:
        return extension()
    except RuntimeError as err:
        log.warning("lightning_ext: %s; the eager path runs instead", err)
        return None


def fusable(p: torch.Tensor) -> bool:
    """A tensor the fused kernels take: a plain (not DTensor) contiguous float32/float64 CPU tensor."""
    return (p.device.type == "cpu" and p.dtype in SUPPORTED_DTYPES and p.is_contiguous()
            and not hasattr(p, "to_local"))


def check_fused_params(name: str, param_groups: list[dict]) -> None:
    """``__init__``-time refusal, as torch.optim does for ``fused=True`` on unsupported tensors."""
    for group in param_groups:
        for p in group["params"]:
            if p.device.type != "cpu" or p.dtype not in SUPPORTED_DTYPES or not p.is_contiguous():
                raise ValueError(f"{name}(fused=True) supports contiguous float32/float64 CPU parameters; got a "
                                 f"{'' if p.is_contiguous() else 'non-contiguous '}{p.dtype} tensor on {p.device}. "
                                 "Use fused=False (or foreach=True on CUDA).")


def contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]
