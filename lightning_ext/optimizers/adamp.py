r"""AdamP and SGDP: "Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights"
(Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha; ICLR 2021, arXiv 2006.08217).

Same arguments, defaults and numbers as the PyPI reference ``adamp`` 0.3.0 (float64 equivalence
tests: <= 1e-10 over 60 steps), written as torch.optim writes its optimizers: class ->
``_init_group`` -> functional dispatcher -> single-tensor / foreach paths, plus ``foreach``.

.. code-block:: text

    AdamP, per tensor w with gradient g (step t kept per tensor):
        m <- b1 m + (1-b1) g ;  v <- b2 v + (1-b2) g^2
        d <- m / (sqrt(v)/sqrt(1-b2^t) + eps)          (nesterov: (b1 m + (1-b1) g) / (...))
        if ndim(w) >= 2 and some view passes max|cos(g_i, w_i)| < delta/sqrt(n):   (channel, then layer)
            d_i <- d_i - <ŵ_i, d_i> ŵ_i,  ŵ_i = w_i/(|w_i| + eps) ;  r <- wd_ratio      else r <- 1
        w <- w (1 - lr wd r) ;  w <- w - lr/(1-b1^t) d

    SGDP: buf <- mu buf + (1-dampening) g ; d <- buf (nesterov: g + mu buf) ; same projection ;
          w <- w (1 - lr wd r / (1-mu)) ; w <- w - lr d

What differs from the reference, on purpose:

* no host synchronisation in ``step``: the reference decides each projection with a Python
  ``if`` on a tensor (1–2 device syncs per matrix per step); here, on accelerators, the decision
  is a 0-d tensor and the projection is selected with ``torch.where`` (see :mod:`._projection`).
  On CPU, where reading a tensor is no device sync, the eager paths branch as the reference does
  and skip the work of a projection that does not fire;
* a ``foreach`` path (multi-tensor kernels for the moments, decay and update), and a ``fused``
  CPU path (one C++ kernel per tensor in two passes over memory, :mod:`._fused_cpu`);
* ``state["step"]`` is a CPU tensor per parameter, as in ``torch.optim.Adam``.

Kept from the reference, although surprising: SGDP without Nesterov projects the momentum
buffer itself (the reference's in-place projection acts on ``buf``), and SGDP's decoupled
decay is divided by ``1 - momentum``, so ``SGDP(delta=0)`` is not ``torch.optim.SGD``.

Under DeepSpeed ZeRO the optimizer sees flat 1-D partitions and the projection could never
fire (AdamP would silently become AdamW): under ZeRO-1/2/3
``step`` computes the statistics exactly on the partitions (``*_shard_*`` functions below, one all-reduce
per statistic round; :mod:`.shard_layout`), and on FSDP2's dim-0 DTensor shards likewise (a param group's local
shards concatenated, ``_base``); under DeepSpeed's BF16 optimizer it still refuses, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lightning_ext._checks import check_number
from lightning_ext.optimizers import _fused_cpu
from lightning_ext.optimizers._base import (PerTensorOptimizer, _bump_versions, _check_betas, _check_flags,
                                            _use_foreach, resolve_fused)
from lightning_ext.optimizers._projection import (
    project_on_cpu_,
    projection_coefficients,
    projection_partials,
    sharded_projection_coefficients,
)

__all__ = ["AdamP", "SGDP", "adamp", "sgdp"]


class AdamP(PerTensorOptimizer):
    """AdamP (see the module docstring). Arguments and defaults as ``adamp.AdamP`` 0.3.0.

    Args:
        params: parameters or param groups.
        lr: learning rate (> 0).
        betas: Adam's (beta1, beta2), each in [0, 1).
        eps: added to the denominator, and the cosine/normalisation epsilon (>= 0).
        weight_decay: decoupled decay (>= 0), scaled by ``wd_ratio`` on projected tensors.
        delta: threshold of the scale-invariance test, in units of 1/sqrt(row length) (>= 0;
            0 never projects, which makes AdamP equal to AdamW).
        wd_ratio: weight-decay multiplier for tensors that were projected, in [0, 1].
        nesterov: Nesterov-style first moment.
        foreach: multi-tensor path (default: on for CUDA tensors, as in torch.optim).
        fused: the fused C++ CPU step (:mod:`._fused_cpu`; contiguous float32/float64 CPU parameters,
            compiled on first use). ``None`` (default) is the fastest available path, as torch's ``foreach=None``:
            the fused step where every tensor of the group can take it, ``foreach`` is left ``None`` and the
            kernels build (else, with one log line if they cannot build, ``foreach``'s choice); ``True`` requires
            it; ``False`` never.
    """

    state_factories = {"step": lambda p: torch.tensor(0.0),
                       "exp_avg": lambda p: torch.zeros_like(p, memory_format=torch.preserve_format),
                       "exp_avg_sq": lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)}
    needs_full_shapes_for = "its scale-invariance projection"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False, foreach: bool | None = None, fused: bool | None = None) -> None:
        check_number("lr", lr, 0.0, low_open=True)
        _check_betas(betas)
        check_number("eps", eps, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("delta", delta, 0.0)
        check_number("wd_ratio", wd_ratio, 0.0, 1.0)
        _check_flags(nesterov=nesterov, foreach=foreach, fused=fused)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _sharded_update(self, group, layout, p, g, state, reduce) -> None:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()  # a CPU tensor: no device sync
        d, stats = adamp_shard_prepare(p, g, state["exp_avg"], state["exp_avg_sq"], step, layout=layout, beta1=beta1,
                                       beta2=beta2, eps=group["eps"], nesterov=group["nesterov"])
        reduce(stats)
        adamp_shard_finish(p, d, stats, step, layout=layout, lr=group["lr"], beta1=beta1, eps=group["eps"],
                           weight_decay=group["weight_decay"], delta=group["delta"], wd_ratio=group["wd_ratio"])

    def _update(self, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        adamp(params, grads, states["exp_avg"], states["exp_avg_sq"], states["step"], foreach=group["foreach"],
              fused=resolve_fused(group, params), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
              weight_decay=group["weight_decay"], delta=group["delta"], wd_ratio=group["wd_ratio"],
              nesterov=group["nesterov"])


def adamp(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
          exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, foreach: bool | None, lr: float,
          beta1: float, beta2: float, eps: float, weight_decay: float, delta: float, wd_ratio: float,
          nesterov: bool, fused: bool | None = None) -> None:
    """Functional AdamP (state updated in place); see :class:`AdamP`."""
    if fused:
        fn = _fused_adamp
    else:
        fn = _multi_tensor_adamp if _use_foreach(foreach, params) else _single_tensor_adamp
    fn(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
       weight_decay=weight_decay, delta=delta, wd_ratio=wd_ratio, nesterov=nesterov)


def _project_(d: torch.Tensor, p: torch.Tensor, g: torch.Tensor, delta: float, eps: float
              ) -> torch.Tensor | bool | None:
    """Remove the radial part of the update ``d`` in place where ``p`` is scale-invariant (ndim >= 2);
    returns the "projected" flag (a 0-d tensor on accelerators, which must not sync; a bool on CPU, where the
    reference's branches skip the work of a projection that does not fire), or ``None`` for tensors that are
    never tested."""
    if p.dim() < 2:
        return None
    if p.device.type == "cpu":
        return project_on_cpu_(p, g, d, delta, eps)
    coef, projected = projection_coefficients(p, g, d, delta, eps)
    d.addcmul_(p, coef, value=-1)
    return projected


def _decay_factor(projected: torch.Tensor | None, lr: float, weight_decay: float, wd_ratio: float,
                  like: torch.Tensor, divisor: float = 1.0) -> torch.Tensor | float:
    plain = 1 - lr * weight_decay / divisor
    if projected is None or projected is False:
        return plain
    if projected is True:
        return 1 - lr * weight_decay * wd_ratio / divisor
    # torch.full fills on the device; torch.tensor(x, device="cuda") would be a blocking host-to-device copy
    reduced = torch.full((), 1 - lr * weight_decay * wd_ratio / divisor, dtype=like.dtype, device=like.device)
    return torch.where(projected, reduced, plain)


def _adam_direction_(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: float, *, beta1: float, beta2: float,
                     eps: float, nesterov: bool) -> torch.Tensor:
    """Update the moments in place and return Adam's direction ``d`` (before projection), for one tensor or one
    rank's flat partition alike."""
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = v.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)
    if nesterov:
        return torch.add(g, m, alpha=beta1 / (1 - beta1)).mul_(1 - beta1).div_(denom)
    return torch.div(m, denom, out=denom)


def _single_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                         delta, wd_ratio, nesterov) -> None:
    for p, g, m, v, step_t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step_t += 1
        step = step_t.item()  # a CPU tensor, as in torch.optim.Adam: no device sync
        d = _adam_direction_(g, m, v, step, beta1=beta1, beta2=beta2, eps=eps, nesterov=nesterov)
        projected = _project_(d, p, g, delta, eps)
        if weight_decay > 0:
            p.mul_(_decay_factor(projected, lr, weight_decay, wd_ratio, p))
        p.add_(d, alpha=-lr / (1 - beta1**step))


def _fused_adamp(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay, delta,
                 wd_ratio, nesterov) -> None:
    torch._foreach_add_(steps, 1)
    step_values = [s.item() for s in steps]  # CPU tensors: no device sync
    _fused_cpu.extension().adamp_(params, _fused_cpu.contiguous(grads), exp_avgs, exp_avg_sqs,
                                  [1 - beta1**s for s in step_values], [math.sqrt(1 - beta2**s) for s in step_values],
                                  lr, beta1, beta2, eps, weight_decay, delta, wd_ratio, nesterov)
    _bump_versions(params, exp_avgs, exp_avg_sqs)


def _multi_tensor_adamp(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                        delta, wd_ratio, nesterov) -> None:
    torch._foreach_add_(steps, 1)
    step_values = [s.item() for s in steps]  # CPU tensors: no device sync
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, [math.sqrt(1 - beta2**s) for s in step_values])
    torch._foreach_add_(denom, eps)
    if nesterov:
        d = torch._foreach_mul(exp_avgs, beta1)
        torch._foreach_add_(d, grads, alpha=1 - beta1)
        torch._foreach_div_(d, denom)
    else:
        d = torch._foreach_div(exp_avgs, denom)
    factors: list[torch.Tensor | float] = []
    for p, g, d_i in zip(params, grads, d):
        projected = _project_(d_i, p, g, delta, eps)
        if weight_decay > 0:
            factors.append(_decay_factor(projected, lr, weight_decay, wd_ratio, p))
    if weight_decay > 0:
        _foreach_scale_(params, factors)
    torch._foreach_mul_(d, [-lr / (1 - beta1**s) for s in step_values])
    torch._foreach_add_(params, d)


def _foreach_scale_(tensors: list[torch.Tensor], factors: list[torch.Tensor | float]) -> None:
    """Multiply each tensor by its factor (0-d tensors and Python floats mixed)."""
    if all(isinstance(f, torch.Tensor) for f in factors):
        torch._foreach_mul_(tensors, factors)
        return
    plain = [(t, f) for t, f in zip(tensors, factors) if not isinstance(f, torch.Tensor)]
    tensor = [(t, f) for t, f in zip(tensors, factors) if isinstance(f, torch.Tensor)]
    if plain:
        torch._foreach_mul_([t for t, _ in plain], [f for _, f in plain])
    if tensor:
        torch._foreach_mul_([t for t, _ in tensor], [f for _, f in tensor])


# -- on shards: one rank's flat local partition (see shard_layout.py); a step is prepare -> all-reduce -> finish --
def adamp_shard_prepare(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, *, layout,
                        beta1: float, beta2: float, eps: float, nesterov: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise half of an AdamP step on a rank's flat local tensors (``m``, ``v`` updated in place;
    ``step`` counts from 1): returns the update direction ``d`` and this rank's partial row statistics, which the
    ranks sum (one collective of ``[4, total_rows]`` per step, whatever the number of parameters)."""
    d = _adam_direction_(g, m, v, step, beta1=beta1, beta2=beta2, eps=eps, nesterov=nesterov)
    return d, projection_partials(layout, p, g, d)


def adamp_shard_finish(p: torch.Tensor, d: torch.Tensor, stats: torch.Tensor, step: int, *, layout, lr: float,
                       beta1: float, eps: float, weight_decay: float, delta: float, wd_ratio: float) -> None:
    """The rest of the step, from the summed statistics: the projection of ``d``, the (per-tensor) weight decay,
    and the update of the local ``p`` — the same arithmetic as the unsharded step, element by element."""
    coef, projected = sharded_projection_coefficients(layout, stats, delta, eps)
    d.addcmul_(p, coef, value=-1)
    if weight_decay > 0:
        _decay_shard_(layout, projected, 1 - lr * weight_decay, 1 - lr * weight_decay * wd_ratio, p)
    p.add_(d, alpha=-lr / (1 - beta1**step))


def _decay_shard_(layout, projected: torch.Tensor, plain: float, reduced: float, p: torch.Tensor) -> None:
    """``p *= plain`` on the local elements of each tensor, ``reduced`` where the tensor was projected."""
    from lightning_ext.optimizers.shard_layout import apply_per_param_

    full = torch.full(projected.shape, plain, dtype=p.dtype, device=p.device)  # (a float32 where() would
    apply_per_param_(layout, p, full.masked_fill_(projected, reduced), "mul_")  # round 1 - lr * wd)


class SGDP(PerTensorOptimizer):
    """SGDP (see the module docstring). Arguments and defaults as ``adamp.SGDP`` 0.3.0.

    Args:
        params: parameters or param groups.
        lr: learning rate (> 0; required, as in the reference).
        momentum: in [0, 1) (the decoupled decay is divided by ``1 - momentum``).
        dampening: in [0, 1].
        weight_decay: decoupled decay (>= 0).
        nesterov: Nesterov momentum.
        eps, delta, wd_ratio, foreach, fused: as in :class:`AdamP`.
    """

    state_factories = {"momentum": lambda p: torch.zeros_like(p, memory_format=torch.preserve_format)}
    needs_full_shapes_for = "its scale-invariance projection"

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, foreach: bool | None = None, fused: bool | None = None) -> None:
        check_number("lr", lr, 0.0, low_open=True)
        check_number("momentum", momentum, 0.0, 1.0, high_open=True)
        check_number("dampening", dampening, 0.0, 1.0)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("eps", eps, 0.0)
        check_number("delta", delta, 0.0)
        check_number("wd_ratio", wd_ratio, 0.0, 1.0)
        _check_flags(nesterov=nesterov, foreach=foreach, fused=fused)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _sharded_update(self, group, layout, p, g, state, reduce) -> None:
        d, stats = sgdp_shard_prepare(p, g, state["momentum"], layout=layout, momentum=group["momentum"],
                                      dampening=group["dampening"], nesterov=group["nesterov"])
        reduce(stats)
        sgdp_shard_finish(p, d, stats, layout=layout, lr=group["lr"], momentum=group["momentum"],
                          weight_decay=group["weight_decay"], eps=group["eps"], delta=group["delta"],
                          wd_ratio=group["wd_ratio"])

    def _update(self, group, params, grads, states) -> None:
        sgdp(params, grads, states["momentum"], foreach=group["foreach"], fused=resolve_fused(group, params),
             lr=group["lr"], momentum=group["momentum"],
             dampening=group["dampening"], weight_decay=group["weight_decay"], nesterov=group["nesterov"],
             eps=group["eps"], delta=group["delta"], wd_ratio=group["wd_ratio"])


def _sgd_direction_(g: torch.Tensor, buf: torch.Tensor, *, momentum: float, dampening: float,
                    nesterov: bool) -> torch.Tensor:
    """Update the momentum buffer in place; the direction is the buffer itself without Nesterov (the reference
    projects it in place), for one tensor or one rank's flat partition alike."""
    buf.mul_(momentum).add_(g, alpha=1 - dampening)
    return g + momentum * buf if nesterov else buf


def sgdp(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor], *, foreach: bool | None,
         lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, eps: float, delta: float,
         wd_ratio: float, fused: bool | None = None) -> None:
    """Functional SGDP (state updated in place); see :class:`SGDP`."""
    if fused:
        _fused_cpu.extension().sgdp_(params, _fused_cpu.contiguous(grads), bufs, lr, momentum, dampening,
                                     weight_decay, nesterov, eps, delta, wd_ratio)
        _bump_versions(params, bufs)
        return
    foreach_path = _use_foreach(foreach, params)
    if foreach_path:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        if nesterov:
            d = torch._foreach_mul(bufs, momentum)
            torch._foreach_add_(d, grads)
        else:
            d = bufs  # the reference projects the momentum buffer itself
    else:
        d = []
        for g, buf in zip(grads, bufs):
            d.append(_sgd_direction_(g, buf, momentum=momentum, dampening=dampening, nesterov=nesterov))
    factors = []
    for p, g, d_i in zip(params, grads, d):
        projected = _project_(d_i, p, g, delta, eps)
        if weight_decay > 0:
            factors.append(_decay_factor(projected, lr, weight_decay, wd_ratio, p, divisor=1 - momentum))
    if weight_decay > 0:
        if foreach_path:
            _foreach_scale_(params, factors)
        else:
            for p, f in zip(params, factors):
                p.mul_(f)
    if foreach_path:
        torch._foreach_add_(params, d, alpha=-lr)
    else:
        for p, d_i in zip(params, d):
            p.add_(d_i, alpha=-lr)


def sgdp_shard_prepare(p: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, *, layout, momentum: float,
                       dampening: float, nesterov: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """SGDP's elementwise half on a rank's flat local tensors (``buf`` updated in place): the direction ``d``
    (the momentum buffer itself without Nesterov, as in the reference, so the projection lands in the buffer)
    and this rank's partial row statistics for the one all-reduce."""
    d = _sgd_direction_(g, buf, momentum=momentum, dampening=dampening, nesterov=nesterov)
    return d, projection_partials(layout, p, g, d)


def sgdp_shard_finish(p: torch.Tensor, d: torch.Tensor, stats: torch.Tensor, *, layout, lr: float, momentum: float,
                      weight_decay: float, eps: float, delta: float, wd_ratio: float) -> None:
    """Projection, per-tensor weight decay (divided by ``1 - momentum`` as in the reference) and the update."""
    coef, projected = sharded_projection_coefficients(layout, stats, delta, eps)
    d.addcmul_(p, coef, value=-1)
    if weight_decay > 0:
        scale = lr * weight_decay / (1 - momentum)
        _decay_shard_(layout, projected, 1 - scale, 1 - scale * wd_ratio, p)
    p.add_(d, alpha=-lr)
