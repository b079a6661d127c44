"""Building the suite's small C++ extensions on first use (``torch.utils.cpp_extension.load``, cached under
``TORCH_EXTENSIONS_DIR``), for every room that has one: the optimizer kernels (:mod:`lightning_ext.optimizers
._fused_cpu`), the top-k selection kernel of :func:`lightning_ext.nn.pruning.kth_smallest`, and the fused layers of
QuEST (:mod:`lightning_ext.nn.quest_fused`) and OneBit (:mod:`lightning_ext.nn.onebit_fused`). No import from the rest
of the package, so ``nn`` and ``optimizers`` both use it without importing each other.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

#: the dtypes every kernel of the suite takes (each C++ source dispatches on exactly these)
KERNEL_DTYPES = (torch.float32, torch.float64)
COMPILED_AFTER_S = 2.0  # a load slower than this compiled the extension (a cached one loads in milliseconds)

SELECT_SOURCE = Path(__file__).with_name("optimizers") / "csrc" / "select_cpu.cpp"
QUEST_SOURCE = Path(__file__).with_name("nn") / "csrc" / "quest_cpu.cpp"
ONEBIT_SOURCE = Path(__file__).with_name("nn") / "csrc" / "onebit_cpu.cpp"


def missing_build_requirement(source: Path) -> str | None:
    """What the build of ``source`` lacks, said so that the user can act on it (``None``: source, compiler, ninja
    all there)."""
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


def build(name: str, source: Path, what: str, flags: list[str], fallback: str) -> ModuleType:
    """Compile (once per machine) and load one extension, or raise a ``RuntimeError`` that says what is missing
    and what ``fallback`` to use."""
    from torch.utils.cpp_extension import load

    missing = missing_build_requirement(source)
    if missing is not None:
        raise RuntimeError(f"{what} needs the lightning_ext C++ kernels, which cannot be built: {missing}. "
                           f"Or use {fallback}.")
    start = time.perf_counter()
    try:
        module = load(name=name, sources=[str(source)], extra_cflags=flags,
                      extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                      verbose=os.environ.get("LIGHTNING_EXT_VERBOSE_BUILD") == "1")
    except (RuntimeError, OSError) as err:  # the compiler failed
        raise RuntimeError(f"{what} needs the lightning_ext C++ kernels, which failed to build ({err}). "
                           f"Set LIGHTNING_EXT_VERBOSE_BUILD=1 to see the compiler's output, or use "
                           f"{fallback}.") from err
    seconds = time.perf_counter() - start
    if seconds > COMPILED_AFTER_S:  # loading a cached build takes milliseconds: this one was compiled
        log.warning("lightning_ext: compiled %s in %.0f s (once per machine; cached under TORCH_EXTENSIONS_DIR)",
                    what, seconds)
    return module


@functools.cache
def select_extension() -> ModuleType | None:
    """The one-pass bracket kernel of :func:`lightning_ext.nn.pruning.kth_smallest` (``select_cpu.cpp``, a few
    seconds to build on first use), or ``None`` where it cannot be built: the selection then runs on ATen
    kernels, exact as well, slower (said once in the log)."""
    try:
        return build("lightning_ext_select_cpu", SELECT_SOURCE, "the top-k selection kernel", ["-O3", "-march=native"],
                     "nothing: the ATen path is used")
    except RuntimeError as err:
        log.warning("lightning_ext: %s; the top-k threshold uses ATen's kernels instead (exact, slower)", err)
        return None


@functools.cache
def quest_extension() -> ModuleType:
    """QuEST's fused rotation + quantizer kernels (``nn/csrc/quest_cpu.cpp``, ~35 s to build on first use). No
    reassociation and no contraction into FMAs: the kernels must repeat the eager path's rounding bit for bit."""
    return build("lightning_ext_quest_cpu", QUEST_SOURCE, "QuEST's fused quantizer kernels",
                 ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"],
                 "fused=False")


@functools.cache
def onebit_extension() -> ModuleType:
    """OneBit's fused effective-weight kernels (``nn/csrc/onebit_cpu.cpp``, ~30 s to build on first use). Row and
    column sums may be reassociated (vectorised): this path is tested against the eager one to rounding."""
    return build("lightning_ext_onebit_cpu", ONEBIT_SOURCE, "OneBit's fused layer kernels",
                 ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math",
                  "-fno-signed-zeros", "-fopenmp"], "fused=False")
