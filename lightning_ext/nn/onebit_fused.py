r"""OneBit's fused CPU path: the value vectors act on the weight, not on the activations
(``nn/csrc/onebit_cpu.cpp``, built by :mod:`lightning_ext._cpp_build` on first use).

``[(X ⊙ g) sign(W)ᵀ] ⊙ h = X W_effᵀ`` with ``W_eff = h ⊙ sign(W) ⊙ gᵀ`` (``out × in``). Eager, the layer pays two
activation-sized elementwise passes forward (``X ⊙ g``, ``⊙ h``) and four backward (the products and the two
reductions for ``dg``, ``dh``), plus five weight-sized ones for the sign and its ``tanh`` surrogate. Fused: one
kernel builds ``W_eff``; autograd's matmuls give ``dX`` and ``dW_eff = dYᵀ X``; one kernel turns ``dW_eff`` and
``tanh(W)`` into ``dW`` (the reference's surrogate ``1.001 − tanh²``), ``dg`` and ``dh``. Only weight-sized passes
remain, so the saving grows with the number of tokens per step.

**Not bit for bit.** The products associate differently (``x·(h·g·s)`` instead of ``(x·g)·s·h``) and the
kernel's row and column sums are vectorised, so the two paths agree to rounding: within ``1e-5`` relative in
float32 and ``1e-12`` in float64 on outputs and on every gradient (``tests/test_onebit_fused.py``), the error of a
float32 matmul of this size; the sign itself — the 1 bit — is the same bit in both. The eager path stays the
reference (``fused=False``) and is what runs on GPUs and in bf16.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_ext import _cpp_build
from lightning_ext.nn._fused_path import FusedPath

#: the kernels, built on first use; ``PATH.use(fused, *tensors)`` picks the path (:mod:`lightning_ext.nn._fused_path`)
PATH = FusedPath("OneBit", _cpp_build.onebit_extension)


class _EffectiveWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, g, h)
        return PATH.extension.effective_weight(weight.detach().contiguous(), g.detach().contiguous(),
                                               h.detach().contiguous())

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        weight, g, h = ctx.saved_tensors
        dw, dg, dh = PATH.extension.effective_weight_backward(grad.contiguous(), torch.tanh(weight).contiguous(),
                                                              g.contiguous(), h.contiguous())
        return dw, dg, dh


def effective_weight(weight: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Differentiable ``h[:, None] * sign_pm1(weight) * g[None, :]`` with the sign's tanh surrogate (see module
    docstring); CPU float32/float64 tensors."""
    return _EffectiveWeight.apply(weight, g, h)
