"""The scale-invariance projection shared by AdamP and SGDP (Heo et al., ICLR 2021, arXiv 2006.08217).

For a weight ``w`` with gradient ``g`` and update direction ``d`` (``ndim >= 2``), the
reference (``adamp`` 0.3.0) tries two views of the tensor — per output channel (rows along dim
0), then the whole tensor as one row — and in the first view where every row passes

    max_i |cos(g_i, w_i)| < delta / sqrt(row length)

it removes the radial part of ``d``: ``d_i -= ŵ_i <ŵ_i, d_i>`` with ``ŵ_i = w_i / (‖w_i‖ + eps)``,
and scales the weight decay by ``wd_ratio``.

The reference decides with ``if tensor < x:`` (a host sync per view per tensor). Here both
views' statistics come from the same row reductions (the layer view's dot products and norms
are sums of the rows'), the decision is a 0-d boolean tensor, and the projection is one
``addcmul`` with a per-row coefficient chosen by ``torch.where`` — no host synchronisation.
The cosine uses ``torch.nn.functional.cosine_similarity``'s eps rule (each norm clamped at
``eps``), so results equal the reference's to rounding (float64 tests: <= 1e-10).
"""

from __future__ import annotations

import math

import torch


def _cosine(dot: torch.Tensor, norm_a: torch.Tensor, norm_b: torch.Tensor, eps: float) -> torch.Tensor:
    return (dot / (norm_a.clamp_min(eps) * norm_b.clamp_min(eps))).abs()


def projection_coefficients(w: torch.Tensor, g: torch.Tensor, d: torch.Tensor, delta: float,
                            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row coefficients ``c`` (shape ``[rows, 1, ...]``) with projected ``d = d - c * w``, and the
    0-d boolean "projected" flag (which scales weight decay by ``wd_ratio``)."""
    rows = w.shape[0]
    w2, g2, d2 = w.reshape(rows, -1), g.reshape(rows, -1), d.reshape(rows, -1)
    n_channel = w2.shape[1]
    # norms and row dot products without full-size temporaries (einsum -> batched matvec)
    w_sq = torch.linalg.vector_norm(w2, dim=1).square()
    g_sq = torch.linalg.vector_norm(g2, dim=1).square()
    gw = torch.einsum("ij,ij->i", g2, w2)
    wd = torch.einsum("ij,ij->i", w2, d2)
    channel = _cosine(gw, w_sq.sqrt(), g_sq.sqrt(), eps).amax() < delta / math.sqrt(n_channel)
    w_norm_all = w_sq.sum().sqrt()
    layer = _cosine(gw.sum(), w_sq.sum().sqrt(), g_sq.sum().sqrt(), eps) < delta / math.sqrt(w.numel())
    coef_channel = wd / (w_sq.sqrt() + eps) ** 2
    coef_layer = wd.sum() / (w_norm_all + eps) ** 2
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    coef = torch.where(channel, coef_channel, torch.where(layer, coef_layer, zero))
    return coef.view([rows] + [1] * (w.dim() - 1)), channel | layer
