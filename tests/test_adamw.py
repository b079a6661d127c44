"""AdamW is torch's own: these tests guard the configuration (class, units), not torch's code."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def test_zero_gradient_decay_matches_the_closed_form():
    w = nn.Parameter(torch.full((3,), 0.5, dtype=torch.float64))
    opt = torch.optim.AdamW([w], lr=1e-3, weight_decay=0.01)
    for _ in range(100):
        w.grad = torch.zeros_like(w)
        opt.step()
    expected = torch.full((3,), 0.5 * (1 - 1e-3 * 0.01) ** 100, dtype=torch.float64)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=0)


def test_adam_with_weight_decay_is_coupled_l2_not_adamw():
    """The YAML pitfall: torch.optim.Adam(weight_decay=...) moves ~lr per step whatever the decay."""
    ends = []
    for wd in (0.01, 0.1):
        w = nn.Parameter(torch.full((1,), 0.5))
        opt = torch.optim.Adam([w], lr=1e-3, weight_decay=wd)
        for _ in range(100):
            w.grad = torch.zeros_like(w)
            opt.step()
        ends.append(w.item())
    assert ends[0] == pytest.approx(0.4, abs=0.01) and ends[0] == pytest.approx(ends[1], abs=1e-5)


def test_foreach_and_single_tensor_are_bit_identical_and_match_algorithm_2():
    torch.manual_seed(0)
    shapes = [(5, 4), (4,), (3, 2, 2)]
    init = [torch.randn(s, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, dtype=torch.float64) for s in shapes] for _ in range(20)]
    lr, (b1, b2), eps, wd = 1e-2, (0.9, 0.999), 1e-8, 0.1
    results = []
    for foreach in (False, True):
        params = [nn.Parameter(t.clone()) for t in init]
        opt = torch.optim.AdamW(params, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, foreach=foreach)
        for gs in grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    # Loshchilov & Hutter's Algorithm 2 in torch's units (decay multiplied by the full lr)
    for w0, got, i in zip(init, results[0], range(len(shapes))):
        w, m, v = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        for t, gs in enumerate(grads, start=1):
            g = gs[i]
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            w = w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        torch.testing.assert_close(got, w, rtol=0, atol=1e-10)
