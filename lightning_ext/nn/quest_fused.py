r"""QuEST's fused CPU path: rotation, quantizer and trust mask in three one-pass C++ kernels
(``nn/csrc/quest_cpu.cpp``, built by :mod:`lightning_ext._cpp_build` on first use).

Eager, one quantized operand costs about fifteen ATen passes over an activation-sized tensor (the rotation
matmul, then divide, clamp, add, round, add, subtract, multiply, subtract, abs, compare, and the mask multiply and
matmul of the backward). Fused: forward = one rotation pass, ATen's row norm (the step), one quantizer pass that
writes the values and the bool trust mask; backward = one pass (mask, then the transposed rotation).

**Which rotation.** The kernels rotate by the Walsh–Hadamard butterflies (``log2(block)`` add/subtract stages in
registers) — the same orthonormal ``blockdiag(H_block)`` as the eager path's ``128 × 128`` matmul, at
``block·log2(block)`` additions per block instead of ``block²`` multiply-adds. Butterflies and matmul round
differently (they agree to a few ulp, :func:`~lightning_ext.nn.hadamard.fwht` vs
:func:`~lightning_ext.nn.hadamard.block_hadamard`), so the fused layer's reference is the eager quantizer applied
after :func:`~lightning_ext.nn.hadamard.fwht`: against it, forward values, trust masks and backward gradients are
**equal bit for bit** in float32 and float64 (every bit width 1–8, odd shapes, NaN; ``tests/test_quest_fused.py``).
A fused and an eager layer therefore differ by an ulp of a row's step (its norm is taken over slightly different
rotated values) and, rarely, by one level where a rotated value lay within those few ulp of a rounding boundary
(fewer than 1 in 1000 values, tested).

**Why C++ and not torch.compile.** Measured at 2048 tokens (2 threads): ``torch.compile`` of the eager rotation +
quantizer ran at the eager speed (25.6 vs 21.1 ms at width 512, 105 vs 109 ms at 2048: inductor leaves the
rotation a matmul and fuses only part of the elementwise chain) after a 32 s compile per shape; these kernels take
~10 ms for the same work at 2048 and build once per machine (~35 s), shape-independent.

Where the kernels cannot run — a tensor on another device or in another dtype (bf16 under autocast), or no
compiler — ``fused=None`` (the default) falls back to the eager path and says so once in the log; ``fused=True``
raises instead.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_ext import _cpp_build
from lightning_ext.nn._fused_path import FusedPath

#: the kernels, built on first use; ``PATH.use(fused, *tensors)`` picks the path (:mod:`lightning_ext.nn._fused_path`)
PATH = FusedPath("QuEST", _cpp_build.quest_extension)
use_fused = PATH.use


def rotate(t: torch.Tensor, block: int) -> torch.Tensor:
    """``fwht(t, block)`` on the butterfly kernel, without gradient (the export's rotation)."""
    rows = t.detach().reshape(-1, t.shape[-1]).contiguous()
    return PATH.extension.rotate_rows(rows, block).view(t.shape)


def _rotate_back(grad: torch.Tensor, mask: torch.Tensor | None, block: int) -> torch.Tensor:
    """``grad · mask`` (``None``: no mask), then the adjoint rotation (``block=0``: none), rows along the last dim."""
    rows = grad.reshape(-1, grad.shape[-1]).contiguous()
    return PATH.extension.rotate_rows_back(rows, mask, block).view(grad.shape)


class _FusedRotate(torch.autograd.Function):
    """The butterfly rotation alone (an unquantized operand: ``act_bits=None``); its backward is the adjoint."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: int) -> torch.Tensor:
        ctx.block = block
        return rotate(x, block)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return _rotate_back(grad, None, ctx.block), None


def fused_rotate(x: torch.Tensor, block: int | None) -> torch.Tensor:
    """Differentiable ``fwht(x, block)`` on the butterfly kernels (``block=None``: ``x`` itself)."""
    return x if block is None else _FusedRotate.apply(x, block)


class _FusedRotateQuantize(torch.autograd.Function):
    """``Q(rotate(x))`` with the trust estimator, rows along the last dimension (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bits: int, scale: str, trust_scale: float | None, block: int | None,
                stats: dict | None) -> torch.Tensor:
        from lightning_ext.nn.quest import record_stats, row_step

        ext = PATH.extension
        rows = x.detach().reshape(-1, x.shape[-1]).contiguous()
        u = ext.rotate_rows(rows, block) if block else rows
        step = row_step(u, bits, scale)
        # the mask is None for the plain straight-through estimator (trust_scale None)
        q, mask = ext.quantize_rows(u, step, bits, -1.0 if trust_scale is None else float(trust_scale))
        ctx.block = block or 0
        ctx.save_for_backward(mask)
        if stats is not None:
            record_stats(stats, q, u, mask)
        return q.view(x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (mask,) = ctx.saved_tensors
        return _rotate_back(grad, mask, ctx.block), None, None, None, None, None


def fused_rotate_quantize(x: torch.Tensor, bits: int, scale: str = "gaussian", trust_scale: float | None = 1.0,
                          block: int | None = 128, stats: dict | None = None) -> torch.Tensor:
    """Differentiable ``trust_quantize(fwht(x, block), ...)`` on the fused kernels (``block=None``: no rotation).
    ``x``: a float32/float64 CPU tensor (see :func:`use_fused`)."""
    return _FusedRotateQuantize.apply(x, bits, scale, trust_scale, block, stats)
