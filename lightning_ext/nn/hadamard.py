"""Orthonormal Walsh–Hadamard transforms along the last dimension, in blocks.

``block_hadamard(x, 128)`` multiplies every consecutive 128-wide block of the last dimension by the
orthonormal Sylvester matrix ``H_128`` (entries ±1/sqrt(128)) — i.e. ``x @ blockdiag(H, ..., H)`` —
as one reshape and one ``128 x 128`` matmul: ``B·in·128`` multiply-adds instead of the ``B·in²`` of
the dense block-diagonal matrix the QuEST reference builds (its cost doubles a square layer).
``fwht`` is the butterfly form (``log2(n)`` add/subtract passes), kept as the second, independent
implementation the tests compare against; on CPU the matmul form is faster (BLAS).

``H`` is symmetric and orthonormal (``H Hᵀ = I``), so the transform is its own inverse and its
transpose. Matrices are built lazily per ``(n, dtype, device)`` and cached — nothing is created at
import (the reference builds its matrix on ``cuda`` at import time). Written here: no maintained
library ships a CPU block Hadamard for PyTorch.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["block_hadamard", "fwht", "hadamard_matrix"]


@functools.lru_cache(maxsize=32)
def _hadamard(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def _check_power_of_two(n: int, what: str) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal ``n x n`` Sylvester–Hadamard matrix (``n`` a power of two); cached, do not modify."""
    _check_power_of_two(n, "n")
    return _hadamard(n, dtype, torch.device(device))


def block_hadamard(x: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``x`` with every ``block``-wide chunk of its last dimension rotated by ``H_block`` (differentiable)."""
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"block_hadamard: the last dimension ({n}) must be a multiple of block={block}")
    h = hadamard_matrix(block, x.dtype, x.device)
    return (x.reshape(*x.shape[:-1], n // block, block) @ h).reshape(x.shape)


def fwht(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Fast Walsh–Hadamard transform (butterflies) of each ``block``-wide chunk (default: the whole last dim),
    orthonormal: equals :func:`block_hadamard`."""
    n = x.shape[-1]
    block = n if block is None else block
    _check_power_of_two(block, "block")
    if n % block:
        raise ValueError(f"fwht: the last dimension ({n}) must be a multiple of block={block}")
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.reshape(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return (y.reshape(x.shape) / math.sqrt(block))
