"""The fused CPU steps of AdamP, SGDP and FAdam (``fused=True``), and the one-pass bracket of the exact top-k
selection (:func:`select_extension`): small C++ extensions.

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
import os
import shutil
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
SELECT_SOURCE = Path(__file__).with_name("csrc") / "select_cpu.cpp"
SUPPORTED_DTYPES = (torch.float32, torch.float64)
# Reassociation lets the compiler vectorise the row sums (their order differs from ATen's anyway);
# no -ffinite-math-only, so NaN/inf behave as in the eager path. -march=native: the build is cached
# per machine (point TORCH_EXTENSIONS_DIR at a node-local folder on clusters with mixed CPUs).
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros",
          "-fopenmp"]


def missing_build_requirement(source: Path | None = None) -> str | None:
    """What the build lacks, said so that the user can act on it (``None``: source, compiler, ninja all there).
    ``source``: the optimizer kernels' by default."""
    source = SOURCE if source is None else source
    if not source.is_file():
        return (f"its C++ source {source} is missing from this installation (a wheel built without package data?); "
                "reinstall lightning-ext from a release or from the repository")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler ({compiler!r} is not on PATH): install one (Debian/Ubuntu: apt-get install g++; "
                "conda: conda install gxx_linux-64), or point CXX at it")
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return 'ninja is not installed: pip install ninja (or pip install "lightning-ext[fused]")'
    return None


def _build(name: str, source: Path, what: str, flags: list[str], fallback: str) -> ModuleType:
    """Compile (once per machine, cached under ``TORCH_EXTENSIONS_DIR``) and load one extension, or raise a
    ``RuntimeError`` that says what is missing and what ``fallback`` to use."""
    from torch.utils.cpp_extension import load

    missing = missing_build_requirement(source)
    if missing is not None:
        raise RuntimeError(f"{what} needs the lightning_ext C++ kernels, which cannot be built: {missing}. "
                           f"Or use {fallback}.")
    log.info("lightning_ext: compiling %s (first use only)", what)
    try:
        return load(name=name, sources=[str(source)], extra_cflags=flags,
                    extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                    verbose=os.environ.get("LIGHTNING_EXT_VERBOSE_BUILD") == "1")
    except (RuntimeError, OSError) as err:  # the compiler failed
        raise RuntimeError(f"{what} needs the lightning_ext C++ kernels, which failed to build ({err}). "
                           f"Set LIGHTNING_EXT_VERBOSE_BUILD=1 to see the compiler's output, or use "
                           f"{fallback}.") from err


@functools.cache
def extension() -> ModuleType:
    """Build (once per machine, about a minute) and load the fused optimizer kernels."""
    return _build("lightning_ext_fused_cpu", SOURCE, "fused=True (the fused CPU optimizer kernels)", CFLAGS,
                  "fused=False")


@functools.cache
def optional_extension() -> ModuleType | None:
    """The optimizer kernels for a path that uses them when it can (FAdam on ZeRO partitions with the default
    ``fused=None``), or ``None`` where they cannot be built: that path then runs eagerly (said once in the log)."""
    try:
        return extension()
    except RuntimeError as err:
        log.warning("lightning_ext: %s; the eager path runs instead", err)
        return None


@functools.cache
def select_extension() -> ModuleType | None:
    """The one-pass bracket kernel of :func:`lightning_ext.nn.pruning.kth_smallest` (``csrc/select_cpu.cpp``, a
    few seconds to build on first use), or ``None`` where it cannot be built: the selection then runs on ATen
    kernels, exact as well, slower (said once in the log)."""
    try:
        return _build("lightning_ext_select_cpu", SELECT_SOURCE, "the top-k selection kernel",
                      ["-O3", "-march=native"],
                      "nothing: the ATen path is used")
    except RuntimeError as err:
        log.warning("lightning_ext: %s; the top-k threshold uses ATen's kernels instead (exact, slower)", err)
        return None


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
