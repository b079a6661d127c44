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
On CPU tensors there is no device to wait for, and :func:`project_on_cpu_` branches as the reference
does (fewer kernels on many small tensors, where their launches dominate the step).
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


def project_on_cpu_(w: torch.Tensor, g: torch.Tensor, d: torch.Tensor, delta: float, eps: float) -> bool:
    """:func:`projection_coefficients` and the projection of ``d`` (in place) with the reference's control flow,
    for CPU tensors, where reading a decision is no device sync: the layer view is tested only when the channel
    view fails, and nothing more is computed when neither passes — a third of the kernels of the branch-free form
    on a tensor where the projection does not fire, which is what makes the eager path on many small tensors as
    fast as the reference. The same quantities (norms by ``vector_norm`` instead of square roots of sums of
    squares, the layer view's cosine in float64): equal to the branch-free form to rounding. Returns whether
    ``d`` was projected."""
    rows = w.shape[0]
    w2, g2, d2 = w.reshape(rows, -1), g.reshape(rows, -1), d.reshape(rows, -1)
    w_norm = torch.linalg.vector_norm(w2, dim=1)
    g_norm = torch.linalg.vector_norm(g2, dim=1)
    gw = torch.linalg.vecdot(g2, w2)
    shape = [rows] + [1] * (w.dim() - 1)
    channel_cos = (gw / (w_norm.clamp_min(eps) * g_norm.clamp_min(eps))).abs_().amax()
    if channel_cos.item() < delta / math.sqrt(w2.shape[1]):
        coef = torch.linalg.vecdot(w2, d2).div_(w_norm.add(eps).square_())
    else:
        w_all = torch.linalg.vector_norm(w_norm).item()
        layer_cos = abs(gw.sum().item()) / (max(w_all, eps) * max(torch.linalg.vector_norm(g_norm).item(), eps))
        if not layer_cos < delta / math.sqrt(w.numel()):
            return False
        coef = (torch.linalg.vecdot(w2, d2).sum() / (w_all + eps) ** 2).expand(rows)
    d.addcmul_(w, coef.view(shape), value=-1)
    return True


# -- on shards ------------------------------------------------------------------------------------------------
#: the per-row sums AdamP's projection needs, in this order: |w|^2, |g|^2, <g, w>, <w, d>
PROJECTION_STATS = 4


def projection_partials(layout, w: torch.Tensor, g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """This rank's ``[4, total_rows]`` partial row sums for :func:`sharded_projection_coefficients`, from its
    flat local ``w``, ``g``, ``d`` (see :mod:`.shard_layout`). The ranks add them with one collective."""
    from lightning_ext.optimizers.shard_layout import row_dots

    return row_dots(layout, [(w, w), (g, g), (g, w), (w, d)])


def sharded_projection_coefficients(layout, stats: torch.Tensor, delta: float, eps: float
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """From the *summed* row statistics, what :func:`projection_coefficients` gives per tensor: a coefficient per
    local element (``d -= c * w``; 0 for 1-D parameters and padding) and a ``[n_params]`` boolean "projected" flag
    (False for tensors with ``ndim < 2``, which are never tested). Both views' decisions use the full rows."""
    w_sq, g_sq, gw, wd = stats
    n = len(layout.shapes)
    device = stats.device
    param_of_row = layout.param_of_row(device)
    per_param = torch.zeros(4, n, dtype=stats.dtype, device=device).index_add_(1, param_of_row, stats)
    row_cos = _cosine(gw, w_sq.sqrt(), g_sq.sqrt(), eps)
    max_cos = torch.zeros(n, dtype=stats.dtype, device=device).scatter_reduce_(0, param_of_row, row_cos, "amax",
                                                                              include_self=False)
    numel = torch.tensor([math.prod(s) for s in layout.shapes], dtype=stats.dtype, device=device)
    rows = torch.tensor([layout.rows(i) for i in range(n)], dtype=stats.dtype, device=device)
    is_matrix = torch.tensor([len(s) >= 2 for s in layout.shapes], device=device)
    channel = max_cos < delta / (numel / rows).sqrt()
    layer = _cosine(per_param[2], per_param[0].sqrt(), per_param[1].sqrt(), eps) < delta / numel.sqrt()
    coef_channel = wd / (w_sq.sqrt() + eps) ** 2
    coef_layer = (per_param[3] / (per_param[0].sqrt() + eps) ** 2)[param_of_row]
    zero = torch.zeros((), dtype=stats.dtype, device=device)
    coef_row = torch.where(channel[param_of_row], coef_channel, torch.where(layer[param_of_row], coef_layer, zero))
    coef_row = torch.where(is_matrix[param_of_row], coef_row, zero)
    from lightning_ext.optimizers.shard_layout import per_row_element

    return per_row_element(layout, coef_row, 0.0), (channel | layer) & is_matrix
