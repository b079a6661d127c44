r"""GoRA's rank allocation and B initialisation (He et al., "GoRA: Gradient-driven Adaptive Low Rank Adaptation",
arXiv 2502.12171, NeurIPS 2025; reference code hhnqqq/MyTransformers ``common/lora_modules/gora.py``).

From the gradient ``G_l`` of each target weight ``W_l`` averaged over calibration batches (the base model,
adapters absent):

* importance ``I_l = mean |W_l ⊙ G_l|`` (the reference script's ``union_mean``), normalised ``a_l = I_l / Σ I``;
* ranks under the budget of uniform LoRA at ``r0``: ``T = r0 Σ (m_l + n_l)``,
  ``r_l = clip(round(T a_l / (m_l + n_l)), r_min, r_max)`` (not renormalised after clipping, as the reference);
* ``B = sign · (γ / s_l) · sqrt(n_l / r_l) · G_l A_l⁺`` with ``A⁺ = Aᵀ (A Aᵀ)⁻¹``, so that the adapter starts
  at ``s_l B A = sign · γ · sqrt(n/r) · G P_A`` — about one compressed gradient step. ``sign = -1`` (descent, the
  paper's derivation) is our default; the public reference code uses ``+1`` (offered as ``sign=+1``).

The base weights are never modified. Written here (peft has no GoRA); the result is expressed as a plain peft
``LoraConfig`` with ``rank_pattern`` and rsLoRA scaling ``α / sqrt(r_l)``, so the saved adapter is standard LoRA.
"""

from __future__ import annotations

import math

import torch

__all__ = ["allocate_ranks", "gora_b_init", "importance"]

ROUNDINGS = {"round": round, "ceil": math.ceil, "floor": math.floor}


def importance(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """``mean |W ⊙ G|`` in float64."""
    return float((weight.detach().double() * grad.double()).abs().mean())


def allocate_ranks(importances: dict[str, float], shapes: dict[str, tuple[int, int]], r0: int, r_min: int,
                   r_max: int, rounding: str = "round") -> dict[str, int]:
    """Per-layer ranks (see module docstring). ``shapes[name] = (out, in)``."""
    if not 1 <= r_min <= r0 <= r_max:
        raise ValueError(f"need 1 <= r_min <= r0 <= r_max, got r_min={r_min}, r0={r0}, r_max={r_max}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {list(ROUNDINGS)}, got {rounding!r}")
    total = sum(importances.values())
    budget = r0 * sum(m + n for m, n in shapes.values())
    ranks = {}
    for name, value in importances.items():
        share = value / total if total > 0 else 1.0 / len(importances)
        m, n = shapes[name]
        ranks[name] = int(min(r_max, max(r_min, ROUNDINGS[rounding](budget * share / (m + n)))))
    return ranks


def gora_b_init(grad: torch.Tensor, a: torch.Tensor, gamma: float, scaling: float, sign: int = -1) -> torch.Tensor:
    """``B`` (out × r) with ``scaling · B A = sign · γ · sqrt(in / r) · G A⁺ A`` (float64 inside)."""
    a64, g64 = a.detach().double(), grad.double()
    r, n_in = a64.shape
    pinv = a64.t() @ torch.linalg.inv(a64 @ a64.t())  # A⁺ = Aᵀ (A Aᵀ)⁻¹, A has full row rank r
    return (sign * gamma / scaling * math.sqrt(n_in / r) * (g64 @ pinv)).to(a.dtype)
