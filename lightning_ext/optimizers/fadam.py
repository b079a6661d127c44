r"""FAdam: "Adam is a natural gradient optimizer using diagonal empirical Fisher information"
(Dongseong Hwang, 2024, arXiv 2405.12807).

No code from the author exists; this is written from the paper's algorithm, with torch.optim's
layering (class -> ``_init_group`` -> functional -> single-tensor / foreach paths).

.. code-block:: text

    per tensor, RMS(x) = sqrt(mean(x^2)), step t kept per tensor:
        b2_t = b2 (1 - b2^(t-1)) / (1 - b2^t)           # bias correction folded in: f_1 = g_1^2
        f    <- b2_t f + (1 - b2_t) g^2                  # diagonal empirical Fisher
        D    = max(f^p + eps_t, min_denominator)
        gbar = g / D ;  gbar <- gbar / max(1, RMS(gbar) / clip)
        m    <- b1 m + (1 - b1) gbar                     # momentum after preconditioning, no bias correction
        wbar = w / D ;  wbar <- wbar / max(1, RMS(wbar) / clip)
        w    <- w - lr (m + weight_decay wbar)

The adaptive epsilon ``eps_t`` changed between versions of the paper and its ports; all are
available through ``eps_mode`` (default ``"v3"``, the latest form traceable to the paper):

==========  ===========================================  ======================================
mode        eps_t                                        source
==========  ===========================================  ======================================
``v3``      ``eps * min(1, RMS(g))``                     paper v3 (lessw2020 port, 93666b5)
``v2``      ``min(eps, eps2 * RMS(g))``, eps2 = 1e-3     paper v2 (lessw2020 port, 7e8dd2a)
``max``     ``eps * max(1, RMS(g))``                     lessw2020 HEAD (NaN fix; not the paper)
``pow2p``   ``min(eps, eps2 * RMS(g)) ** (2p)``,         ``pytorch-optimizer`` 4.1.0 (eps^(2p)
            eps2 = 0.01                                  when RMS(g) = 0)
==========  ===========================================  ======================================

Decisions that are ours, not the paper's:

* ``min_denominator`` (default 1e-20) floors D: under ``v3`` an all-zero gradient gives f = 0 and
  eps_t = 0, and the references then compute 0/0 = NaN.
* **Dead coordinates** (``dead_coord_wd``). Coordinates whose Fisher is exactly 0 (weights on
  inputs that are always zero, unseen embedding rows) have ``w / D ≈ w / eps``, which dominates
  the per-tensor RMS clip of ``wbar``: those coordinates decay to ~0 within a few hundred steps
  and weight decay on the *rest* of the tensor effectively switches off (measured in the spec:
  dead columns' norm ratio 0.001, live columns' 1.24 vs 1.02 without the dead inputs).
  ``"mask"`` (default) leaves f = 0 coordinates out of the weight-decay term and out of its RMS;
  ``"paper"`` is the formula as written (use it to compare with the references).
* The step counter is per parameter (``pytorch-optimizer`` keeps one per group, which gives a
  tensor that skips steps the wrong ``b2_t``); state ``m`` and ``f`` are kept in the parameter's
  dtype, or in float32 for half-precision parameters.

Under DeepSpeed ZeRO the per-tensor RMS would become an RMS over a flat mix of tensors:
under ZeRO-1/2/3
``step`` computes the statistics exactly on the partitions (``*_shard_*`` functions below, one all-reduce
per statistic round; :mod:`.shard_layout`), and on FSDP2's dim-0 DTensor shards likewise (a param group's local
shards concatenated, ``_base``); under DeepSpeed's BF16 optimizer it still refuses, naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from lightning_ext._checks import check_choice, check_number
from lightning_ext.optimizers import _fused_cpu
from lightning_ext.optimizers._base import (PerTensorOptimizer, _bump_versions, _check_betas, _check_flags,
                                            _use_foreach, resolve_fused)

__all__ = ["FAdam", "fadam", "EPS_MODES"]

EPS_MODES = ("v3", "v2", "max", "pow2p")
_DEFAULT_EPS2 = {"v2": 1e-3, "pow2p": 1e-2}
DEAD_COORD_MODES = ("mask", "paper")


def _state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class FAdam(PerTensorOptimizer):
    """FAdam (see the module docstring).

    Args:
        params: parameters or param groups.
        lr: learning rate (> 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: epsilon of the adaptive rule (>= 0).
        weight_decay: coefficient of the Fisher-preconditioned, clipped decay term (>= 0; 0.1 as in
            the paper — not comparable with AdamW's ``weight_decay``).
        clip: RMS cap of the natural gradient and of the decay term (> 0).
        p: exponent of the Fisher (> 0; 0.5 gives Adam's denominator).
        eps_mode: one of ``"v3"``, ``"v2"``, ``"max"``, ``"pow2p"``.
        eps2: RMS multiplier of the ``v2``/``pow2p`` modes (default 1e-3 / 1e-2).
        min_denominator: floor of D (>= 0).
        dead_coord_wd: ``"mask"`` or ``"paper"`` (see the module docstring).
        foreach: multi-tensor path (default: on for CUDA tensors, as in torch.optim).
        fused: the fused C++ CPU step (:mod:`._fused_cpu`; contiguous float32/float64 CPU parameters,
            compiled on first use). ``None`` (default) is the fastest available path: on whole tensors as in
            :class:`~lightning_ext.optimizers.AdamP`, on DeepSpeed ZeRO partitions the fused partition kernels
            where they build (:func:`fadam_shard_fused`); ``False`` the eager rounds.
    """

    state_factories = {"step": lambda p: torch.tensor(0.0),
                       "momentum": lambda p: torch.zeros_like(p, dtype=_state_dtype(p)),
                       "fim": lambda p: torch.zeros_like(p, dtype=_state_dtype(p))}
    needs_full_shapes_for = "its per-tensor RMS clipping"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.1, clip: float = 1.0, p: float = 0.5,
                 eps_mode: str = "v3", eps2: float | None = None, min_denominator: float = 1e-20,
                 dead_coord_wd: str = "mask", foreach: bool | None = None, fused: bool | None = None) -> None:
        check_number("lr", lr, 0.0, low_open=True)
        _check_betas(betas)
        check_number("eps", eps, 0.0)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("clip", clip, 0.0, low_open=True)
        check_number("p", p, 0.0, low_open=True)
        check_number("min_denominator", min_denominator, 0.0)
        check_choice("eps_mode", eps_mode, EPS_MODES)
        check_choice("dead_coord_wd", dead_coord_wd, DEAD_COORD_MODES)
        _check_flags(foreach=foreach, fused=fused)
        if eps2 is None:
            eps2 = _DEFAULT_EPS2.get(eps_mode, 0.0)
        check_number("eps2", eps2, 0.0)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, clip=clip, p=p,
                        eps_mode=eps_mode, eps2=eps2, min_denominator=min_denominator,
                        dead_coord_wd=dead_coord_wd, foreach=foreach, fused=fused)
        super().__init__(params, defaults)

    def _sharded_update(self, group, layout, p, g, state, reduce) -> None:
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"].item()
        if _fused_partition(group, p, g):
            fadam_shard_fused(p, g, state["momentum"], state["fim"], step, layout=layout, reduce=reduce,
                              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], eps2=group["eps2"],
                              weight_decay=group["weight_decay"], clip=group["clip"], p=group["p"],
                              eps_mode=group["eps_mode"], min_denominator=group["min_denominator"],
                              dead_coord_wd=group["dead_coord_wd"])
            return
        stats1 = fadam_shard_round1(g, state["fim"], step, layout=layout, beta2=beta2)
        reduce(stats1)
        scratch = self.__dict__.setdefault("_shard_scratch", {})
        if id(p) not in scratch or scratch[id(p)][0].shape != state["fim"].shape:
            scratch[id(p)] = tuple(torch.empty_like(state["fim"]) for _ in range(3))
        gbar, wbar, stats2 = fadam_shard_round2(p, g, state["fim"], stats1, layout=layout, eps=group["eps"],
                                                eps2=group["eps2"], p=group["p"], eps_mode=group["eps_mode"],
                                                min_denominator=group["min_denominator"],
                                                dead_coord_wd=group["dead_coord_wd"], scratch=scratch[id(p)])
        reduce(stats2)
        fadam_shard_finish(p, state["momentum"], gbar, wbar, stats2, layout=layout, lr=group["lr"], beta1=beta1,
                           weight_decay=group["weight_decay"], clip=group["clip"],
                           dead_coord_wd=group["dead_coord_wd"])

    def _update(self, group, params, grads, states) -> None:
        beta1, beta2 = group["betas"]
        fadam(params, grads, states["momentum"], states["fim"], states["step"], foreach=group["foreach"],
              fused=resolve_fused(group, params),
              lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
              clip=group["clip"], p=group["p"], eps_mode=group["eps_mode"], eps2=group["eps2"],
              min_denominator=group["min_denominator"], dead_coord_wd=group["dead_coord_wd"])


def _host(t: torch.Tensor) -> torch.Tensor | float:
    """A 0-d statistic as the eager paths use it: read into a Python float on CPU (no device sync there, and the
    scalar arithmetic that follows costs no kernel launches — on many small tensors these launches were most of
    the step), left a tensor elsewhere (no sync)."""
    return t.item() if t.device.type == "cpu" else t


def _adaptive_eps(rms_g: torch.Tensor | float, eps: float, eps2: float, p: float, mode: str) -> torch.Tensor | float:
    if isinstance(rms_g, float):  # the same rules on a host scalar
        if mode == "v3":
            return eps * min(rms_g, 1.0)
        if mode == "v2":
            return min(eps2 * rms_g, eps)
        if mode == "max":
            return eps * max(rms_g, 1.0)
        scaled = eps2 * rms_g
        return scaled ** (2 * p) if rms_g > 0 and scaled < eps else eps ** (2 * p)
    if mode == "v3":
        return eps * rms_g.clamp_max(1.0)
    if mode == "v2":
        return (eps2 * rms_g).clamp_max(eps)
    if mode == "max":
        return eps * rms_g.clamp_min(1.0)
    scaled = eps2 * rms_g  # pow2p
    fallback = torch.full_like(scaled, eps ** (2 * p))
    return torch.where((rms_g > 0) & (scaled < eps), scaled.pow(2 * p), fallback)


def _rms(x: torch.Tensor) -> torch.Tensor | float:
    return _host(torch.linalg.vector_norm(x)) / math.sqrt(x.numel())


def _clip_(x: torch.Tensor, rms: torch.Tensor | float, clip: float) -> torch.Tensor:
    if isinstance(rms, float):
        return x.div_(rms / clip) if rms / clip > 1.0 else x  # dividing by 1.0 would change nothing
    return x.div_((rms / clip).clamp_min(1.0))


def _decay_term(w: torch.Tensor, denom: torch.Tensor, fim: torch.Tensor, clip: float, dead_coord_wd: str):
    wbar = w.to(denom.dtype) / denom
    if dead_coord_wd == "paper":
        return _clip_(wbar, _rms(wbar), clip)
    live = _host(torch.count_nonzero(fim))
    if isinstance(live, int):  # on the host: nothing to mask when every coordinate is live (the common case)
        if live < fim.numel():
            wbar.masked_fill_(fim == 0, 0.0)
        return _clip_(wbar, _host(torch.linalg.vector_norm(wbar)) / math.sqrt(max(live, 1)), clip)
    wbar.masked_fill_(fim == 0, 0.0)
    return _clip_(wbar, torch.linalg.vector_norm(wbar) / live.clamp_min(1).to(wbar.dtype).sqrt(), clip)


def fadam(params: list[torch.Tensor], grads: list[torch.Tensor], momenta: list[torch.Tensor],
          fims: list[torch.Tensor], steps: list[torch.Tensor], *, foreach: bool | None, lr: float, beta1: float,
          beta2: float, eps: float, weight_decay: float, clip: float, p: float, eps_mode: str, eps2: float,
          min_denominator: float, dead_coord_wd: str, fused: bool | None = None) -> None:
    """Functional FAdam (state updated in place); see :class:`FAdam`."""
    if fused:
        fn = _fused_fadam
    else:
        fn = _multi_tensor_fadam if _use_foreach(foreach, params) else _single_tensor_fadam
    fn(params, grads, momenta, fims, steps, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
       clip=clip, p=p, eps_mode=eps_mode, eps2=eps2, min_denominator=min_denominator, dead_coord_wd=dead_coord_wd)


def _beta2_hat(beta2: float, step: float) -> float:
    return beta2 * (1 - beta2 ** (step - 1)) / (1 - beta2**step)


# -- on shards: one rank's flat local partition (see shard_layout.py); two statistic rounds per step -----------
def fadam_shard_round1(g: torch.Tensor, fim: torch.Tensor, step: int, *, layout, beta2: float) -> torch.Tensor:
    """Update the Fisher ``fim`` in place (``step`` counts from 1) and return this rank's ``[1, n_params]``
    partial sums of ``g²`` (the gradient RMS behind the adaptive epsilon). The ranks sum them (collective 1)."""
    from lightning_ext.optimizers.shard_layout import param_dots

    b2 = _beta2_hat(beta2, step)
    g = g.to(fim.dtype)
    fim.mul_(b2).addcmul_(g, g, value=1 - b2)
    return param_dots(layout, [(g, g)])


def fadam_shard_round2(w: torch.Tensor, g: torch.Tensor, fim: torch.Tensor, stats1: torch.Tensor, *, layout,
                       eps: float, eps2: float, p: float, eps_mode: str, min_denominator: float,
                       dead_coord_wd: str, scratch: tuple[torch.Tensor, ...] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From the summed ``g²``: the natural gradient ``gbar`` and the decay direction ``wbar`` (dead coordinates
    zeroed in ``"mask"`` mode), and this rank's ``[3, n_params]`` partial sums — ``gbar²``, ``wbar²`` and the live
    coordinates (``fim != 0``) — for the two RMS clips (collective 2). ``scratch``: three buffers shaped like ``fim``
    that ``gbar``, ``wbar`` and the denominator are written into (kept by the caller across steps: on CPU fresh partition-sized
    tensors cost page faults every step)."""
    from lightning_ext.optimizers.shard_layout import apply_per_param_, fill_padding_, param_dots, param_nonzeros

    numel = torch.tensor([math.prod(s) for s in layout.shapes], dtype=stats1.dtype, device=stats1.device)
    # the epsilon is a function of each tensor's gradient RMS: computed per tensor, added in place per tensor
    # (padding: the epsilon of RMS 0)
    if scratch:
        denom = torch.sqrt(fim, out=scratch[2]) if p == 0.5 else torch.pow(fim, p, out=scratch[2])
    else:
        denom = fim.sqrt() if p == 0.5 else fim.pow(p)
    apply_per_param_(layout, denom, _adaptive_eps((stats1[0] / numel).sqrt(), eps, eps2, p, eps_mode), "add_")
    fill_padding_(layout, denom, _adaptive_eps(stats1.new_zeros(()), eps, eps2, p, eps_mode))
    denom.clamp_min_(min_denominator)
    gbar = torch.div(g.to(fim.dtype), denom, out=scratch[0]) if scratch else g.to(fim.dtype).div(denom)
    wbar = torch.div(w.to(denom.dtype), denom, out=scratch[1]) if scratch else w.to(denom.dtype).div(denom)
    live = param_nonzeros(layout, fim)  # the live coordinates (fim != 0) of each tensor
    if dead_coord_wd == "mask":  # fim >= 0: its sign is 1 where live, 0 where dead (into denom, no longer needed: a
        wbar.mul_(torch.sign(fim, out=denom))  # float multiply is several times faster than a bool mask on CPU)
    stats = param_dots(layout, [(gbar, gbar), (wbar, wbar)])
    return gbar, wbar, torch.cat([stats, live[None]])


def fadam_shard_finish(w: torch.Tensor, m: torch.Tensor, gbar: torch.Tensor, wbar: torch.Tensor,
                       stats2: torch.Tensor, *, layout, lr: float, beta1: float, weight_decay: float, clip: float,
                       dead_coord_wd: str) -> None:
    """Clip ``gbar`` and ``wbar`` by their whole-tensor RMS (from the summed statistics), then update the momentum
    and the local weights — the arithmetic of the unsharded step, element by element."""
    from lightning_ext.optimizers.shard_layout import apply_per_param_

    numel = torch.tensor([math.prod(s) for s in layout.shapes], dtype=stats2.dtype, device=stats2.device)
    rms_gbar = stats2[0].sqrt() / numel.sqrt()  # _clip_ per tensor, in place on each tensor's local elements
    m.lerp_(apply_per_param_(layout, gbar, (rms_gbar / clip).clamp_min(1.0), "div_"), 1 - beta1)
    if weight_decay > 0:
        count = numel if dead_coord_wd == "paper" else stats2[2].clamp_min(1)
        rms_wbar = stats2[1].sqrt() / count.sqrt()
        wbar = apply_per_param_(layout, wbar, (rms_wbar / clip).clamp_min(1.0), "div_")
        w.add_(wbar.to(w.dtype), alpha=-lr * weight_decay)
    w.add_(m.to(w.dtype), alpha=-lr)


def _fused_partition(group: dict, p: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether a flat partition takes the fused kernels: unless ``fused=False``, on contiguous float32/float64 CPU
    tensors where the extension builds (the eager rounds otherwise, with one log line from the build)."""
    if group.get("fused") is False or p.device.type != "cpu" or p.dtype not in _fused_cpu.SUPPORTED_DTYPES:
        return False
    if not (p.is_contiguous() and g.is_contiguous() and g.dtype == p.dtype):
        return False
    return _fused_cpu.optional_extension() is not None


def _partition_segments(layout) -> torch.Tensor:
    """``[S, 3]`` int64 (start, length, parameter) of a layout's segments and of its padding (parameter
    ``len(layout.shapes)``), cached on the layout."""
    cached = layout.__dict__.get("_fadam_segments")
    if cached is None:
        from lightning_ext.optimizers.shard_layout import padding_ranges

        n = len(layout.shapes)
        rows = [(s.start, s.length, s.param) for s in layout.segments]
        rows += [(start, length, n) for start, length in padding_ranges(layout)]
        cached = torch.tensor(sorted(rows), dtype=torch.int64).reshape(-1, 3)
        layout.__dict__["_fadam_segments"] = cached  # a frozen dataclass: its __dict__ still takes a cache
    return cached


def fadam_shard_fused(w, g, m, fim, step, *, layout, reduce, lr, beta1, beta2, eps, eps2, weight_decay, clip, p,
                      eps_mode, min_denominator, dead_coord_wd) -> None:
    """The sharded step in three passes of the fused kernels (``csrc/fused_cpu.cpp``) instead of the eager rounds'
    ~15: the sums of ``g²`` per parameter; the Fisher update with the sums behind the two clips; the momentum and
    weight update. The same two collectives, in float64; the arithmetic is the unsharded fused kernel's, segment by
    segment (equal to the eager rounds within rounding)."""
    ext = _fused_cpu.extension()
    segs = _partition_segments(layout)
    n = len(layout.shapes)
    numel = torch.tensor([math.prod(s) for s in layout.shapes], dtype=torch.float64)
    stats1 = ext.fadam_shard_gsq(g, segs, n)[None]
    reduce(stats1)
    eps_pp = torch.cat([_adaptive_eps((stats1[0] / numel).sqrt(), eps, eps2, p, eps_mode),
                        _adaptive_eps(torch.zeros(1, dtype=torch.float64), eps, eps2, p, eps_mode)])
    decay, mask = weight_decay > 0, dead_coord_wd == "mask"
    stats2 = ext.fadam_shard_pass1_(w, g, fim, segs, eps_pp, n, _beta2_hat(beta2, step), p, min_denominator, decay,
                                    mask)
    reduce(stats2)
    ones = torch.ones(1, dtype=torch.float64)
    g_div = torch.cat([(stats2[0].sqrt() / numel.sqrt() / clip).clamp_min(1.0), ones])
    count = stats2[2].clamp_min(1.0) if mask else numel
    w_div = torch.cat([(stats2[1].sqrt() / count.sqrt() / clip).clamp_min(1.0), ones])
    ext.fadam_shard_pass2_(w, g, m, fim, segs, eps_pp, g_div, w_div, beta1, lr, weight_decay, p, min_denominator,
                           decay, mask)
    _bump_versions([w], [m], [fim])


def _fused_fadam(params, grads, momenta, fims, steps, *, lr, beta1, beta2, eps, weight_decay, clip, p, eps_mode,
                 eps2, min_denominator, dead_coord_wd) -> None:
    torch._foreach_add_(steps, 1)
    b2 = [_beta2_hat(beta2, s.item()) for s in steps]  # CPU tensors: no device sync
    _fused_cpu.extension().fadam_(params, _fused_cpu.contiguous(grads), momenta, fims, b2, lr, beta1, eps,
                                  weight_decay, clip, p, EPS_MODES.index(eps_mode), eps2, min_denominator,
                                  dead_coord_wd == "mask")
    _bump_versions(params, momenta, fims)


def _single_tensor_fadam(params, grads, momenta, fims, steps, *, lr, beta1, beta2, eps, weight_decay, clip, p,
                         eps_mode, eps2, min_denominator, dead_coord_wd) -> None:
    for w, g, m, f, step_t in zip(params, grads, momenta, fims, steps):
        step_t += 1
        b2 = _beta2_hat(beta2, step_t.item())  # CPU tensor: no device sync
        g = g.to(f.dtype)
        f.mul_(b2).addcmul_(g, g, value=1 - b2)
        eps_t = _adaptive_eps(_rms(g), eps, eps2, p, eps_mode)
        denom = (f.sqrt() if p == 0.5 else f.pow(p)).add_(eps_t)
        if not (isinstance(eps_t, float) and eps_t > 2 * min_denominator):  # else the floor cannot bind: f >= 0
            denom.clamp_min_(min_denominator)
        gbar = g / denom
        m.lerp_(_clip_(gbar, _rms(gbar), clip), 1 - beta1)
        if weight_decay > 0:
            w.add_(_decay_term(w, denom, f, clip, dead_coord_wd).to(w.dtype), alpha=-lr * weight_decay)
        w.add_(m.to(w.dtype), alpha=-lr)


def _multi_tensor_fadam(params, grads, momenta, fims, steps, *, lr, beta1, beta2, eps, weight_decay, clip, p,
                        eps_mode, eps2, min_denominator, dead_coord_wd) -> None:
    torch._foreach_add_(steps, 1)
    b2 = [_beta2_hat(beta2, s.item()) for s in steps]  # CPU tensors: no device sync
    grads = [g.to(f.dtype) for g, f in zip(grads, fims)]
    torch._foreach_mul_(fims, b2)
    torch._foreach_addcmul_(fims, grads, grads, [1 - b for b in b2])
    sqrt_n = [math.sqrt(g.numel()) for g in grads]
    rms_g = torch._foreach_div(torch._foreach_norm(grads), sqrt_n)
    eps_t = [_adaptive_eps(_host(r), eps, eps2, p, eps_mode) for r in rms_g]
    denom = torch._foreach_sqrt(fims) if p == 0.5 else torch._foreach_pow(fims, p)
    torch._foreach_add_(denom, eps_t)
    torch._foreach_clamp_min_(denom, min_denominator)
    gbar = torch._foreach_div(grads, denom)
    rms_gbar = torch._foreach_div(torch._foreach_norm(gbar), sqrt_n)
    torch._foreach_div_(rms_gbar, clip)
    torch._foreach_clamp_min_(rms_gbar, 1.0)
    torch._foreach_div_(gbar, rms_gbar)
    torch._foreach_lerp_(momenta, gbar, 1 - beta1)
    if weight_decay > 0:
        if dead_coord_wd == "paper":
            wbar = torch._foreach_div([w.to(d.dtype) for w, d in zip(params, denom)], denom)
            rms_w = torch._foreach_div(torch._foreach_norm(wbar), sqrt_n)
            torch._foreach_div_(rms_w, clip)
            torch._foreach_clamp_min_(rms_w, 1.0)
            torch._foreach_div_(wbar, rms_w)
        else:
            wbar = [_decay_term(w, d, f, clip, dead_coord_wd) for w, d, f in zip(params, denom, fims)]
        update = torch._foreach_mul(wbar, weight_decay)
        torch._foreach_add_(update, momenta)
    else:
        update = momenta
    if all(u.dtype == w.dtype for u, w in zip(update, params)):
        torch._foreach_add_(params, update, alpha=-lr)
    else:
        torch._foreach_add_(params, [u.to(w.dtype) for u, w in zip(update, params)], alpha=-lr)
