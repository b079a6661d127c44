"""The shard-layout layer and AdamP's statistics on shards, with simulated ranks (no processes): float64, world
sizes 2, 3 and 4, awkward shapes (rows straddling partition boundaries, a tensor smaller than the world, empty
shards). Sharded = unsharded within 1e-12; the naive shard-local statistic is the negative control."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ext.optimizers import AdamP
from lightning_ext.optimizers._projection import (projection_coefficients, projection_partials,
                                                  sharded_projection_coefficients)
from lightning_ext.optimizers.adamp import adamp_shard_finish, adamp_shard_prepare
from lightning_ext.optimizers.shard_layout import ShardLayout, row_sums

SHAPES = [(7, 13), (1, 29), (29, 1), (2,), (3, 5, 2), (13,), (4, 4)]
WORLDS = [2, 3, 4]
LAYOUTS = {"flat": ShardLayout.flat_partition, "dim0": ShardLayout.dim0_shards,
           "zero3": ShardLayout.per_param_partitions}


def _tensors(seed: int, shapes=SHAPES) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_every_element_is_held_by_exactly_one_rank(kind, world):
    full = _tensors(0)
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    held = [torch.zeros(math.prod(s), dtype=torch.long) for s in SHAPES]
    for layout in layouts:
        for seg in layout.segments:
            held[seg.param][seg.offset:seg.offset + seg.length] += 1
    assert all(bool((h == 1).all()) for h in held)
    rebuilt = [torch.zeros_like(t) for t in full]
    for layout in layouts:
        layout.scatter_into(layout.local(full), rebuilt)
    assert all(torch.equal(a, b) for a, b in zip(full, rebuilt))
    if kind == "zero3":  # every parameter cut across the ranks; (2,) leaves the later ranks only padding
        assert all(any(seg.param == i for seg in layouts[0].segments) for i in range(len(SHAPES)))
        if world > 2:
            assert all(seg.param != 3 for seg in layouts[-1].segments)
    if kind in ("flat", "zero3"):  # rows straddle partition boundaries somewhere
        row_len = [math.prod(s) // s[0] if len(s) >= 2 else math.prod(s) for s in SHAPES]
        assert any((seg.offset % row_len[seg.param]) or (seg.length % row_len[seg.param])
                   for layout in layouts for seg in layout.segments if len(SHAPES[seg.param]) >= 2)
    else:  # dim-0 shards keep rows whole; a rank may hold no row of a tensor
        assert all(seg.offset % (math.prod(SHAPES[seg.param]) // SHAPES[seg.param][0]) == 0
                   for layout in layouts for seg in layout.segments)
        assert any(all(seg.param != 1 for seg in layout.segments) for layout in layouts)  # (1, 29): one rank


@pytest.mark.parametrize("world", WORLDS)
def test_row_sums_added_over_ranks_are_the_unsharded_row_sums(world):
    full = _tensors(1)
    whole = ShardLayout.unsharded(SHAPES)
    expected = row_sums(whole, [whole.local(full) ** 2])
    layouts = [ShardLayout.flat_partition(SHAPES, world, r) for r in range(world)]
    summed = sum(row_sums(lay, [lay.local(full) ** 2]) for lay in layouts)
    torch.testing.assert_close(summed, expected, rtol=1e-12, atol=1e-12)
    by_hand = torch.cat([t.reshape(t.shape[0], -1).square().sum(1) if t.dim() >= 2 else t.square().sum()[None]
                         for t in full])
    torch.testing.assert_close(expected[0], by_hand, rtol=1e-12, atol=1e-12)


def _projection_inputs(seed: int):
    """Weights, gradients and directions with some tensors scale-invariant enough to be projected: a gradient
    nearly orthogonal to its weight passes AdamP's cosine test."""
    w, g, d = _tensors(seed), _tensors(seed + 1), _tensors(seed + 2)
    for i, rows in ((0, None), (4, None), (6, 2)):  # g ⟂ w per row: the channel view projects; for the (4, 4)
        w2, g2 = w[i].reshape(w[i].shape[0], -1)[:rows], g[i].reshape(g[i].shape[0], -1)[:rows]  # only half of
        g2 -= (g2 * w2).sum(1, keepdim=True) / (w2 * w2).sum(1, keepdim=True) * w2  # the rows: a rank-local view errs
    w1, g1 = w[1].reshape(-1), g[1].reshape(-1)  # (1, 29): one row = the layer
    g1 -= (g1 @ w1) / (w1 @ w1) * w1
    return w, g, d


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_projection_on_shards_equals_the_unsharded_one_and_the_shard_local_one_does_not(kind, world):
    w, g, d = _projection_inputs(3)
    delta, eps = 0.1, 1e-8
    expected_coef, expected_flag = [], []
    for wi, gi, di in zip(w, g, d):
        if wi.dim() >= 2:
            c, flag = projection_coefficients(wi, gi, di, delta, eps)
            expected_coef.append(c.expand_as(wi))
            expected_flag.append(bool(flag))
        else:
            expected_coef.append(torch.zeros_like(wi))
            expected_flag.append(False)
    assert sum(expected_flag) >= 3  # the test covers projected tensors
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    partials = [projection_partials(lay, lay.local(w), lay.local(g), lay.local(d)) for lay in layouts]
    summed = sum(partials)  # the one all-reduce
    rebuilt = [torch.zeros_like(t) for t in w]
    naive_rebuilt = [torch.zeros_like(t) for t in w]
    for lay, own in zip(layouts, partials):
        coef, flags = sharded_projection_coefficients(lay, summed, delta, eps)
        assert flags.tolist() == expected_flag
        lay.scatter_into(coef, rebuilt)
        naive, _ = sharded_projection_coefficients(lay, own, delta, eps)  # the negative control
        lay.scatter_into(naive, naive_rebuilt)
    for got, want in zip(rebuilt, expected_coef):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    worst = max(float((a - b).abs().max()) for a, b in zip(naive_rebuilt, expected_coef))
    assert worst > 1e-6  # shard-local statistics give another answer


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_adamp_steps_on_shards_equal_adamp_on_full_tensors(world, kind, nesterov):
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, delta=0.1, wd_ratio=0.1, nesterov=nesterov)
    params = [torch.nn.Parameter(t) for t in _projection_inputs(5)[0]]
    reference = AdamP(params, **hp, foreach=False)
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    local_p = [lay.local([p.detach() for p in params]) for lay in layouts]
    local_m = [torch.zeros_like(x) for x in local_p]
    local_v = [torch.zeros_like(x) for x in local_p]
    projected_steps = 0
    for step in range(1, 7):
        _, grads, _ = _projection_inputs(10 * step)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        reference.step()
        prepared = [adamp_shard_prepare(local_p[r], lay.local(grads), local_m[r], local_v[r], step, layout=lay,
                                        beta1=0.9, beta2=0.999, eps=1e-8, nesterov=nesterov)
                    for r, lay in enumerate(layouts)]
        summed = sum(stats for _, stats in prepared)
        projected_steps += int(sharded_projection_coefficients(layouts[0], summed, 0.1, 1e-8)[1].sum())
        for r, lay in enumerate(layouts):
            adamp_shard_finish(local_p[r], prepared[r][0], summed, step, layout=lay, lr=1e-2, beta1=0.9, eps=1e-8,
                               weight_decay=0.1, delta=0.1, wd_ratio=0.1)
    assert projected_steps > 0
    rebuilt = [torch.zeros_like(p.detach()) for p in params]
    for lay, x in zip(layouts, local_p):
        lay.scatter_into(x, rebuilt)
    for got, want in zip(rebuilt, params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def test_one_statistics_tensor_per_step_whatever_the_number_of_parameters():
    """The collective's payload is one [4, total_rows] tensor: its count per step does not grow with the
    number of parameters (only its length does)."""
    for n in (1, 10, 50):
        shapes = [(3, 4)] * n
        lay = ShardLayout.flat_partition(shapes, 2, 0)
        w = g = d = lay.local(_tensors(0, shapes))
        stats = projection_partials(lay, w, g, d)
        assert isinstance(stats, torch.Tensor) and stats.shape == (4, 3 * n)


def _fadam_on_shards(layouts, params0, grads_per_step, hp, stats_of):
    """FAdam's two-round shard step on every simulated rank; ``stats_of(partials, r)`` is the collective
    (the sum over ranks) or, for the negative control, the rank's own partial."""
    from lightning_ext.optimizers.fadam import fadam_shard_finish, fadam_shard_round1, fadam_shard_round2

    w = [lay.local(params0) for lay in layouts]
    m = [torch.zeros_like(x) for x in w]
    f = [torch.zeros_like(x) for x in w]
    for step, grads in enumerate(grads_per_step, start=1):
        g = [lay.local(grads) for lay in layouts]
        round1 = [fadam_shard_round1(g[r], f[r], step, layout=lay, beta2=hp["beta2"]) for r, lay in enumerate(layouts)]
        round2 = [fadam_shard_round2(w[r], g[r], f[r], stats_of(round1, r), layout=lay, eps=hp["eps"],
                                     eps2=hp["eps2"], p=0.5, eps_mode=hp["eps_mode"], min_denominator=1e-20,
                                     dead_coord_wd=hp["dead_coord_wd"]) for r, lay in enumerate(layouts)]
        for r, lay in enumerate(layouts):
            gbar, wbar, _ = round2[r]
            fadam_shard_finish(w[r], m[r], gbar, wbar, stats_of([x[2] for x in round2], r), layout=lay,
                               lr=hp["lr"], beta1=0.9, weight_decay=hp["weight_decay"], clip=hp["clip"],
                               dead_coord_wd=hp["dead_coord_wd"])
    out = [torch.zeros_like(t) for t in params0]
    for lay, x in zip(layouts, w):
        lay.scatter_into(x, out)
    return out


@pytest.mark.parametrize("mode", [("v3", "mask"), ("pow2p", "paper")])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_fadam_steps_on_shards_equal_fadam_on_full_tensors(world, kind, mode):
    from lightning_ext.optimizers import FAdam

    eps_mode, dead = mode
    # clip small enough that both RMS clips act; eps large enough that the adaptive epsilon matters
    hp = dict(lr=1e-2, beta2=0.999, eps=1e-1, eps2=1e-2, eps_mode=eps_mode, weight_decay=0.1, clip=0.5,
              dead_coord_wd=dead)
    params0 = _tensors(7)
    grads_per_step = []
    for step in range(6):
        grads = _tensors(20 + step)
        grads[0].view(-1)[:20] = 0.0  # dead coordinates (a Fisher of exactly 0), across a partition boundary too
        grads_per_step.append(grads)
    params = [torch.nn.Parameter(t.clone()) for t in params0]
    reference = FAdam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-1, eps2=1e-2, eps_mode=eps_mode,
                      weight_decay=0.1, clip=0.5, dead_coord_wd=dead, foreach=False)
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        reference.step()
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    sharded = _fadam_on_shards(layouts, params0, grads_per_step, hp, lambda partials, r: sum(partials))
    for got, want in zip(sharded, params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    naive = _fadam_on_shards(layouts, params0, grads_per_step, hp, lambda partials, r: partials[r])
    assert max(float((a - b.detach()).abs().max()) for a, b in zip(naive, params)) > 1e-6


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_sgdp_steps_on_shards_equal_sgdp_on_full_tensors(world, kind, nesterov):
    from lightning_ext.optimizers import SGDP
    from lightning_ext.optimizers.adamp import sgdp_shard_finish, sgdp_shard_prepare

    hp = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.1, nesterov=nesterov, eps=1e-8, delta=0.1,
              wd_ratio=0.1)
    params = [torch.nn.Parameter(t) for t in _projection_inputs(5)[0]]
    reference = SGDP(params, **hp, foreach=False)
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    local_p = [lay.local([p.detach() for p in params]) for lay in layouts]
    bufs = [torch.zeros_like(x) for x in local_p]
    for step in range(1, 7):
        _, grads, _ = _projection_inputs(10 * step)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        reference.step()
        prepared = [sgdp_shard_prepare(local_p[r], lay.local(grads), bufs[r], layout=lay, momentum=0.9,
                                       dampening=0.0, nesterov=nesterov) for r, lay in enumerate(layouts)]
        summed = sum(stats for _, stats in prepared)
        for r, lay in enumerate(layouts):
            sgdp_shard_finish(local_p[r], prepared[r][0], summed, layout=lay, lr=0.05, momentum=0.9,
                              weight_decay=0.1, eps=1e-8, delta=0.1, wd_ratio=0.1)
    rebuilt = [torch.zeros_like(p.detach()) for p in params]
    for lay, x in zip(layouts, local_p):
        lay.scatter_into(x, rebuilt)
    for got, want in zip(rebuilt, params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)


def _lawn_on_shards(layouts, params0, grads_per_step, free, which, options, stats_of):
    from lightning_ext.optimizers.lawn import lawn_shard_partials, lawn_shard_project_grad_, lawn_shard_rescale_

    norm_scope, constraint, project = options
    local = [torch.nn.Parameter(lay.local(params0)) for lay in layouts]
    bases = [torch.optim.SGD([x], lr=0.3, momentum=0.9) for x in local]  # elementwise: exact on a partition
    constrained = torch.tensor([i in which for i in range(len(params0))])
    radii: dict[int, torch.Tensor] = {}
    for step, grads in enumerate(grads_per_step):
        for lay, x in zip(layouts, local):
            x.grad = lay.local(grads)
        if step >= free:
            partials = [lawn_shard_partials(lay, x.detach(), x.grad if project else None, norm_scope=norm_scope)
                        for lay, x in zip(layouts, local)]
            for r, (lay, x) in enumerate(zip(layouts, local)):
                summed = stats_of(partials, r)
                radii.setdefault(r, summed[0].sqrt())
                if project:
                    lawn_shard_project_grad_(lay, x.detach(), x.grad, summed, norm_scope=norm_scope,
                                             constrained=constrained)
        for base in bases:
            base.step()
        if step >= free:
            partials = [lawn_shard_partials(lay, x.detach(), norm_scope=norm_scope) for lay, x in zip(layouts, local)]
            for r, (lay, x) in enumerate(zip(layouts, local)):
                lawn_shard_rescale_(lay, x.detach(), radii[r], stats_of(partials, r), norm_scope=norm_scope,
                                    constraint=constraint, constrained=constrained)
    rebuilt = [torch.zeros_like(t) for t in params0]
    for lay, x in zip(layouts, local):
        lay.scatter_into(x.detach(), rebuilt)
    return rebuilt


@pytest.mark.parametrize("options", [("layer", "sphere", False), ("row", "ball", True), ("row", "sphere", True)])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_lawn_on_shards_equals_lawn_on_full_tensors(world, kind, options):
    from lightning_ext.optimizers import LAWN
    from lightning_ext.optimizers.lawn import _norms

    norm_scope, constraint, project = options
    free, which = 2, [0, 2, 4]  # (7, 13), (29, 1) and (3, 5, 2) constrained; the others trained freely
    params0 = _tensors(11)
    grads_per_step = [_tensors(40 + step) for step in range(8)]
    params = [torch.nn.Parameter(t.clone()) for t in params0]
    reference = LAWN(torch.optim.SGD(params, lr=0.3, momentum=0.9), [params[i] for i in which], free_steps=free,
                     norm_scope=norm_scope, constraint=constraint, project_grad=project)
    for grads in grads_per_step:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        reference.step()
    for i, radius in zip(which, reference.radii()):  # the constraint acted on the reference
        norms = _norms(params[i].detach(), norm_scope)
        assert bool((norms <= radius * (1 + 1e-12)).all())
        if constraint == "sphere":
            torch.testing.assert_close(norms, radius, rtol=1e-12, atol=0)
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    sharded = _lawn_on_shards(layouts, params0, grads_per_step, free, which, options, lambda parts, r: sum(parts))
    for got, want in zip(sharded, params):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    naive = _lawn_on_shards(layouts, params0, grads_per_step, free, which, options, lambda parts, r: parts[r])
    naive_error = max(float((a - b.detach()).abs().max()) for a, b in zip(naive, params))
    # the shard-local statistic is wrong exactly where a norm's elements (a row, or a whole tensor) are split
    units = [set() for _ in layouts]
    for r, lay in enumerate(layouts):
        index = lay.row_index() if norm_scope == "row" else lay.param_index()
        owner = lay.param_of_row() if norm_scope == "row" else torch.arange(len(SHAPES))
        units[r] = {int(u) for u in index[index >= 0].unique() if int(owner[u]) in which}
    split = any(units[a] & units[b] for a in range(world) for b in range(a + 1, world))
    assert (naive_error > 1e-6) == split, (split, naive_error)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", [("v3", "mask"), ("pow2p", "paper")])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.parametrize("world", WORLDS)
def test_fused_fadam_on_shards_equals_the_eager_rounds(world, kind, mode, dtype):
    """The fused partition step (three kernel passes, the collectives between them) equals the eager rounds on the
    same simulated ranks: within 1e-12 in float64, a few ulps in float32; with the collective replaced by the rank's
    own partial (negative control) it does not."""
    from lightning_ext.optimizers.fadam import fadam_shard_fused
    from test_sharded_masks import SimulatedRanks

    eps_mode, dead = mode
    hp = dict(lr=1e-2, beta2=0.999, eps=1e-1, eps2=1e-2, eps_mode=eps_mode, weight_decay=0.1, clip=0.5,
              dead_coord_wd=dead)
    params0 = [t.to(dtype) for t in _tensors(7)]
    grads_per_step = []
    for step in range(6):
        grads = [t.to(dtype) for t in _tensors(20 + step)]
        grads[0].view(-1)[:20] = 0.0
        grads_per_step.append(grads)
    layouts = [LAYOUTS[kind](SHAPES, world, r) for r in range(world)]
    eager = _fadam_on_shards(layouts, params0, grads_per_step, hp, lambda partials, r: sum(partials))

    def fused(local_only: bool) -> list[torch.Tensor]:
        w = [lay.local(params0).contiguous() for lay in layouts]
        m = [torch.zeros_like(x) for x in w]
        f = [torch.zeros_like(x) for x in w]
        ranks = SimulatedRanks(world)
        for step, grads in enumerate(grads_per_step, start=1):
            g = [lay.local(grads).contiguous() for lay in layouts]
            ranks.run(lambda r, comm: fadam_shard_fused(
                w[r], g[r], m[r], f[r], step, layout=layouts[r],
                reduce=(lambda t: None) if local_only else comm.all_reduce,
                lr=hp["lr"], beta1=0.9, beta2=hp["beta2"], eps=hp["eps"], eps2=hp["eps2"],
                weight_decay=hp["weight_decay"], clip=hp["clip"], p=0.5, eps_mode=eps_mode, min_denominator=1e-20,
                dead_coord_wd=dead))
        out = [torch.zeros_like(t) for t in params0]
        for lay, x in zip(layouts, w):
            lay.scatter_into(x, out)
        return out

    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    for got, want in zip(fused(False), eager):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    if world > 1:
        assert max(float((a - b).abs().max()) for a, b in zip(fused(True), eager)) > 1e-6
