"""OneBit's fused CPU path (lightning_ext.nn.onebit_fused): the eager layer's outputs and gradients to rounding,
the formula's sign and surrogate exactly; chosen by default; a clear fallback where it cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_ext.callbacks import OneBit
from lightning_ext.nn import onebit_fused
from lightning_ext.nn._fused_path import FusedPath
from lightning_ext.nn.onebit import OneBitLinear, sign_pm1
from lightning_ext.nn.onebit_fused import effective_weight

pytestmark = pytest.mark.skipif(onebit_fused.PATH.unsupported(torch.zeros(1)) is not None,
                                reason="the OneBit kernels cannot be built here (no compiler)")

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}


def _pair(dtype: torch.dtype, bias: bool, layer_norm: bool) -> tuple[OneBitLinear, OneBitLinear]:
    lin = nn.Linear(97, 41, bias=bias).to(dtype)
    eager = OneBitLinear.from_linear(lin, layer_norm=layer_norm, fused=False)
    with torch.no_grad():  # a trained latent: signs of both kinds, zeros included
        eager.weight.add_(torch.randn_like(eager.weight) * 0.02)
        eager.weight[0, :5] = 0.0
    fused = OneBitLinear.from_linear(lin, layer_norm=layer_norm, fused=True)
    fused.load_state_dict(eager.state_dict())
    return eager, fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,layer_norm", [(False, True), (True, False)])
def test_fused_layer_equals_eager_to_rounding(dtype, bias, layer_norm):
    torch.manual_seed(0)
    eager, fused = _pair(dtype, bias, layer_norm)
    x = torch.randn(3, 5, 97, dtype=dtype)
    g = torch.randn(3, 5, 41, dtype=dtype)
    outs, grads = [], []
    for layer in (eager, fused):
        xr = x.clone().requires_grad_()
        out = layer(xr)
        out.backward(g)
        outs.append(out.detach())
        grads.append([xr.grad] + [p.grad for p in layer.parameters()])
    assert (eager.last_path, fused.last_path) == ("eager", "fused")
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol * outs[0].abs().max())
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max())


def test_effective_weight_is_the_formula_and_its_surrogate():
    """Negative control for the equality above: the weight is h·sign(W)·g with sign(0) = +1 exactly, and the
    latent's gradient is the reference's 1.001 − tanh² surrogate (a plain straight-through one would differ)."""
    torch.manual_seed(1)
    w = torch.randn(6, 9, dtype=torch.float64)
    w[0, 0] = 0.0
    g, h = torch.rand(9, dtype=torch.float64) + 0.5, torch.rand(6, dtype=torch.float64) + 0.5
    w.requires_grad_()
    out = effective_weight(w, g, h)
    assert torch.equal(out.detach(), h[:, None] * sign_pm1(w.detach()) * g[None, :])
    upstream = torch.randn(6, 9, dtype=torch.float64)
    out.backward(upstream)
    surrogate = upstream * h[:, None] * g[None, :] * (1.001 - torch.tanh(w.detach()) ** 2)
    torch.testing.assert_close(w.grad, surrogate, rtol=1e-12, atol=0)  # products in another order
    assert not torch.allclose(w.grad, upstream * h[:, None] * g[None, :])


def test_gradients_of_the_value_vectors_sum_over_threads():
    """dg is a column sum accumulated per thread: the same with 1 and 2 threads (to rounding), and right."""
    torch.manual_seed(2)
    w, g, h = torch.randn(300, 64), torch.rand(64, requires_grad=True), torch.rand(300, requires_grad=True)
    upstream = torch.randn(300, 64)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            g.grad = h.grad = None
            effective_weight(w, g, h).backward(upstream)
            grads.append((g.grad.clone(), h.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    signed = upstream * sign_pm1(w)
    torch.testing.assert_close(grads[0][0], (signed * h[:, None]).sum(0).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], (signed * g[None, :]).sum(1).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-5)


def test_default_falls_back_once_and_fused_true_refuses(caplog, monkeypatch):
    FusedPath.say_fallback_once.cache_clear()
    layer = OneBitLinear.from_linear(nn.Linear(16, 8))
    layer(torch.randn(2, 16, dtype=torch.bfloat16).float())
    assert layer.last_path == "fused"
    with caplog.at_level(logging.WARNING, logger="lightning_ext.nn._fused_path"):
        layer.bfloat16()
        for _ in range(3):
            layer(torch.randn(2, 16, dtype=torch.bfloat16))
    assert layer.last_path == "eager"
    lines = [r.getMessage() for r in caplog.records if "OneBit" in r.getMessage()]
    assert len(lines) == 1 and "torch.bfloat16" in lines[0]
    layer.fused = True
    with pytest.raises(RuntimeError, match=r"OneBit\(fused=True\).*bfloat16"):
        layer(torch.randn(2, 16, dtype=torch.bfloat16))
    monkeypatch.setitem(onebit_fused.PATH.__dict__, "_built", (None, "ninja is not installed"))
    with pytest.raises(RuntimeError, match="ninja is not installed"):
        OneBitLinear.from_linear(nn.Linear(16, 8), fused=True)(torch.randn(2, 16))


def test_fused_argument_is_checked_and_reaches_the_layers():
    with pytest.raises(ValueError, match="fused must be True or False or None"):
        OneBit(fused="no")
    layers = OneBit(fused=False, exclude=[]).prepare(nn.Sequential(nn.Linear(16, 16)))
    assert [layer.fused for layer in layers.values()] == [False]
