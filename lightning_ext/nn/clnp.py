r"""The masked layer and the pruning search of CLNP: "Continual Learning via Neural Pruning"
(Golkar, Kagan, Cho; NeurIPS 2019 workshop "Real Neurons & Hidden Units", arXiv 1903.04476).
:class:`lightning_ext.callbacks.CLNP` is the Lightning glue.

Every hidden neuron (a row of a :class:`CLNPLinear`) carries an allocation ``a``: the task that owns
it, or :data:`FREE`; a layer's inputs carry the allocations of the previous layer's neurons (``-1``
for the network's inputs). The forward pass enforces, with no gradient masks:

* the connection rule — weight ``j -> i`` is used only if ``a(j) <= a(i)``: new neurons read old
  ones, old neurons never read new (or free) ones; a task's head has ``a = task`` on every row;
* freezing — rows of finished tasks come from a frozen copy (a buffer), not from the trainable
  weight, so weight decay, momentum and optimizer sharding (DeepSpeed ZeRO) cannot move them.

Old outputs therefore stay bit-identical: each old neuron sums exactly the same products plus exact
zeros (for the same shapes, kernels and thread count; activations must be finite).

Fast path (the usual case during training: every trainable row may read every input, and the weight
is a plain ``Parameter`` — not a DeepSpeed ZeRO-3 partition): instead of building ``W_eff`` (a full
pass over the matrix forward and one backward, ~30 % of a step on a CPU MLP), the forward copies the
frozen rows' values into ``weight`` in place, under ``no_grad``, right before the matmul, and the
backward computes the weight gradient of the trainable rows only (frozen rows get exact zeros). What the
optimizer did to those rows in between (weight decay) is overwritten before every use, so the frozen
copy remains the source of truth. A second call of the layer inside one graph (before its backward)
does not copy again (its graph saved the restored weight). Fully frozen layers (old heads) multiply by the
frozen copy directly; anything else (a connection mask on a trainable row, ZeRO-3, a small layer:
:attr:`CLNPLinear.fast_path_min_numel`) takes the general ``W_eff`` path.

No maintained library implements CLNP and no official code exists; written from the paper. The
paper's L1 regulariser is on activations (``l1_on="activations"``, default) — secondary sources use
weight L1, offered as ``"weights"`` / ``"both"``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FREE", "CLNPLinear", "activity_l1", "threshold_search"]

FREE = torch.iinfo(torch.int16).max  # larger than every task index: free neurons are read by no task
# gloo (DDP's CPU backend) cannot broadcast int16 or bool buffers: allocations are int32, flags uint8
ALLOC_DTYPE = torch.int32


class CLNPLinear(nn.Linear):
    """``nn.Linear`` with per-row allocations, the connection rule and frozen rows (see module docstring).

    Build with :meth:`from_linear` (the original ``Parameter`` objects are kept). Buffers, all in the
    ``state_dict`` (so in every checkpoint): ``alloc`` (int32 ``[out]``), ``in_alloc`` (int32 ``[in]``),
    ``frozen_rows`` (uint8 ``[out]``; :attr:`frozen` is its bool view), ``frozen_weight`` / ``frozen_bias``
    (the frozen rows' values, already multiplied by the connection mask when frozen; zero on other rows).

    ``fast_path_min_numel``: weights with fewer elements take the ``W_eff`` path even where the in-place
    fast path applies — on small layers its two weight-sized passes cost less than the fast path's
    Python-level autograd function (CPU, 2 threads, fwd+bwd vs a plain ``nn.Linear``: W_eff 1.38x, fast
    1.96x at 128x128, batch 32; W_eff 1.53x, fast 1.10x at 512x512, batch 128; crossing near 256x256).
    """

    #: the technique whose surgery installs this layer (lightning_ext.surgery refuses a second one on it)
    surgery_technique = "CLNP"

    fast_path_min_numel = 1 << 16

    @classmethod
    def from_linear(cls, linear: nn.Linear, row_alloc: int = FREE) -> CLNPLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        out, inp = linear.out_features, linear.in_features
        new.register_buffer("alloc", torch.full((out,), row_alloc, dtype=ALLOC_DTYPE, device=linear.weight.device))
        new.register_buffer("in_alloc", torch.full((inp,), -1, dtype=ALLOC_DTYPE, device=linear.weight.device))
        new.register_buffer("frozen_rows", torch.zeros(out, dtype=torch.uint8, device=linear.weight.device))
        new.register_buffer("frozen_weight", torch.zeros_like(linear.weight, requires_grad=False))
        new.register_buffer("frozen_bias", torch.zeros_like(linear.bias, requires_grad=False)
                            if linear.bias is not None else None)
        # derived from the buffers above, recomputed by refresh() whenever they change (not saved):
        # the forward is then one addcmul, W_eff = frozen_weight + W * train_mask
        for name, like in (("train_mask", linear.weight), ("train_rows", linear.weight[:, 0])):
            new.register_buffer(name, torch.zeros_like(like, requires_grad=False), persistent=False)
        new.activity_hook = None  # set by the CLNP callback: called with (layer, output)
        new._live = None  # weakref to the autograd node of the last fast-path forward (see _RowFrozenLinear)
        new.register_load_state_dict_post_hook(lambda module, incompatible: module.refresh())
        new.refresh()
        return new

    @property
    def frozen(self) -> torch.Tensor:
        """``[out]`` bool: rows of finished tasks."""
        return self.frozen_rows.bool()

    def allowed(self) -> torch.Tensor:
        """``[out, in]`` bool: the connection rule, by a broadcast compare (no stored mask)."""
        return self.in_alloc.unsqueeze(0) <= self.alloc.unsqueeze(1)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the cached masks from ``alloc``, ``in_alloc`` and the frozen rows."""
        allowed, frozen = self.allowed(), self.frozen.unsqueeze(1)
        self.train_mask.copy_(allowed & ~frozen)
        self.train_rows.copy_(~self.frozen)
        # host-side facts for the forward's choice of path (one sync here, none per step)
        frozen_idx = self.frozen.nonzero().squeeze(1)
        self._n_frozen = int(frozen_idx.numel())
        self._rows_only = bool((allowed | frozen).all())  # no connection mask on a trainable row
        # compact copies for the fast path (non-persistent buffers, so .to() moves them)
        self.register_buffer("_frozen_idx", frozen_idx, persistent=False)
        self.register_buffer("_train_idx", (~self.frozen).nonzero().squeeze(1), persistent=False)
        self.register_buffer("_frozen_w", self.frozen_weight.index_select(0, frozen_idx), persistent=False)
        self.register_buffer("_frozen_b", self.frozen_bias.index_select(0, frozen_idx)
                             if self.bias is not None else None, persistent=False)
        self._live = None

    def effective_weight(self) -> torch.Tensor:
        """Frozen rows from their copy, trainable rows from ``weight``, disallowed connections exactly 0
        (``x + 0 == x`` and ``w * 1 == w`` exactly, so values equal a select-and-mask). ``frozen_weight`` is
        zero outside frozen rows and was masked when frozen; a frozen row's mask never changes afterwards
        (the neurons it may read keep their allocation for good)."""
        return torch.addcmul(self.frozen_weight, self.weight, self.train_mask)

    def effective_bias(self) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return torch.addcmul(self.frozen_bias, self.bias, self.train_rows)

    def _use_fast_path(self) -> bool:
        return (self._rows_only and type(self.weight) is nn.Parameter and not hasattr(self.weight, "ds_id")
                and self.weight.numel() >= self.fast_path_min_numel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._n_frozen == self.out_features:  # an old head: nothing trains
            out = F.linear(x, self.frozen_weight, self.frozen_bias)
        elif self._n_frozen == 0 and self._rows_only:  # nothing frozen, nothing masked
            out = F.linear(x, self.weight, self.bias)
        elif self._use_fast_path():
            out = _RowFrozenLinear.apply(x, self.weight, self.bias, self)
        else:
            out = F.linear(x, self.effective_weight(), self.effective_bias())
        if self.activity_hook is not None:
            self.activity_hook(self, out)
        return out

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Write the frozen rows' values into ``weight`` / ``bias`` (fast path; see module docstring)."""
        # index_put_ (a row copy per index) is several times faster than index_copy_ on CPU
        self.weight.index_put_((self._frozen_idx,), self._frozen_w.to(self.weight.dtype))
        if self.bias is not None:
            self.bias.index_put_((self._frozen_idx,), self._frozen_b.to(self.bias.dtype))

    def _restored_in_pending_graph(self) -> bool:
        """True while the last fast-path forward's graph awaits its backward and ``weight`` has not been
        modified in place since that forward restored it (restoring again would invalidate that graph)."""
        node = self._live() if self._live is not None else None
        return node is not None and not node.done and node.version == self.weight._version

    @torch.no_grad()
    def freeze_rows(self, rows: torch.Tensor) -> None:
        """Copy the rows' current effective values into the frozen buffers and freeze them."""
        weight = self.weight * self.allowed()
        self.frozen_weight[rows] = weight[rows].to(self.frozen_weight.dtype)
        if self.bias is not None:
            self.frozen_bias[rows] = self.bias[rows].to(self.frozen_bias.dtype)
        self.frozen_rows[rows] = 1
        self.refresh()

    @torch.no_grad()
    def reinit_rows(self, rows: torch.Tensor, generator: torch.Generator) -> None:
        """nn.Linear's default initialisation for the given rows (seeded: identical on every rank)."""
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        n = int(rows.sum())
        if n == 0:
            return
        # kaiming_uniform(a=sqrt(5)) as nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
        values = (torch.rand(n, self.in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.weight[rows] = values.to(self.weight.dtype).to(self.weight.device)
        if self.bias is not None:
            b = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.bias[rows] = b.to(self.bias.dtype).to(self.bias.device)


class _RowFrozenLinear(torch.autograd.Function):
    """``F.linear`` on a weight whose frozen rows are restored in place first; their gradients are zero."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                layer: CLNPLinear) -> torch.Tensor:
        if not layer._restored_in_pending_graph():
            layer.restore_frozen_rows()
        ctx.save_for_backward(x, weight)
        ctx.frozen_idx, ctx.train_idx, ctx.has_bias = layer._frozen_idx, layer._train_idx, bias is not None
        ctx.done, ctx.version = False, weight._version
        layer._live = weakref.ref(ctx)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.done = True
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.matmul(weight)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            # only the trainable rows' gradient is computed (a GEMM of n_train rows instead of out_features);
            # frozen rows get exact zeros
            frozen_idx, train_idx = ctx.frozen_idx, ctx.train_idx
            grad_train = grad.reshape(-1, grad.shape[-1]).index_select(1, train_idx)
            if ctx.needs_input_grad[1]:
                grad_w = weight.new_empty(weight.shape).index_fill_(0, frozen_idx, 0)
                grad_w.index_put_((train_idx,), grad_train.t().mm(x.reshape(-1, x.shape[-1])))
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = weight.new_empty(weight.shape[0]).index_fill_(0, frozen_idx, 0)
                grad_b.index_put_((train_idx,), grad_train.sum(0))
        return grad_x, grad_w, grad_b, None


def activity_l1(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``sum(relu(out) * rows)`` over every sample and row: CLNP's activation-L1 term for the rows marked in
    ``rows`` (``[out_features]``, 0/1), accumulated in at least fp32 (``out`` is bf16 under autocast).
    Native ops only: a one-node custom autograd function measured slower (its Python cost exceeds the pass it
    saves, at 128 and at 1024 wide)."""
    acc = torch.promote_types(out.dtype, torch.float32)
    return torch.relu(out).reshape(-1, out.shape[-1]).sum(0, dtype=acc).mul(rows.to(acc)).sum()


def threshold_search(activity: torch.Tensor, accuracy_if_kept: Callable[[torch.Tensor], float],
                     full_accuracy: float, margin: float) -> tuple[torch.Tensor, float, float]:
    """The largest activity threshold whose pruning keeps validation accuracy >= ``full - margin``.

    ``activity``: mean activity of each candidate neuron (flat over layers). ``accuracy_if_kept(mask)``
    evaluates with only ``mask``'s candidates kept. Binary search over the sorted activities (assumes
    accuracy is non-increasing as more neurons are pruned: ~log2(n) evaluations); pruning keeps at
    least one neuron. Returns ``(keep mask, threshold, accuracy)``.
    """
    order = activity.argsort()
    sorted_act = activity[order]
    target = full_accuracy - margin

    def keep_mask(n_pruned: int) -> torch.Tensor:
        mask = torch.ones_like(activity, dtype=torch.bool)
        mask[order[:n_pruned]] = False
        return mask

    low, high = 0, activity.numel() - 1  # prune `low` passes; search the largest passing count
    best_acc = full_accuracy
    while low < high:
        mid = (low + high + 1) // 2
        acc = accuracy_if_kept(keep_mask(mid))
        if acc >= target:
            low, best_acc = mid, acc
        else:
            high = mid - 1
    threshold = float(sorted_act[low - 1]) if low > 0 else -math.inf
    return keep_mask(low), threshold, best_acc


def check_no_normalization(model: nn.Module, layers: Sequence[str]) -> None:
    """Normalisation layers mix old and new neurons (statistics, shared affine maps): refuse them."""
    bad = [(name, type(m).__name__) for name, m in model.named_modules()
           if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm))]
    if bad:
        raise ValueError(f"CLNP cannot guarantee zero forgetting with normalisation layers, whose statistics and "
                         f"affine parameters span old and new neurons; found {bad}. Use a network without "
                         f"normalisation on the pruned layers {list(layers)} (CLNP targets MLP/CNN hidden units).")
