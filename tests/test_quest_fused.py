"""QuEST's fused CPU kernels (lightning_ext.nn.quest_fused): bit-for-bit equal to the eager quantizer after the
eager butterfly rotation, forward and backward; chosen by default; a clear fallback where they cannot run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext.callbacks import QuEST
from lightning_ext.nn import quest_fused
from lightning_ext.nn._fused_path import FusedPath
from lightning_ext.nn.hadamard import block_hadamard, fwht
from lightning_ext.nn.quest import QuestLinear, trust_quantize
from lightning_ext.nn.quest_fused import fused_rotate_quantize

pytestmark = pytest.mark.skipif(quest_fused.PATH.unsupported(torch.zeros(1)) is not None,
                                reason="the QuEST kernels cannot be built here (no compiler)")


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bit for bit (NaN equal to NaN; +0 and -0 are the same value)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def _eager(x: torch.Tensor, bits: int, scale: str, trust: float | None, block: int | None) -> torch.Tensor:
    return trust_quantize(fwht(x, block) if block else x, bits, scale, trust)


# block 128 runs the AVX-512 register path where the CPU has it, 32 and 256 the portable loop; shapes are odd
CASES = [((37, 384), 128), ((3, 5, 256), 128), ((11, 96), 32), ((4, 512), 256), ((9, 100), None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,block", CASES)
def test_fused_equals_eager_butterfly_bit_for_bit(dtype, shape, block):
    torch.manual_seed(0)
    for bits in range(1, 9):
        for scale, trust in (("gaussian", 1.0), ("gaussian", None), ("absmax", 0.5)):
            x = (torch.randn(shape, dtype=dtype) * torch.rand(shape[:-1] + (1,), dtype=dtype) * 4)
            x[0, 3] = float("nan")  # a NaN row stays NaN, its mask is empty, as in the eager path
            g = torch.randn(shape, dtype=dtype)
            xe, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
            stats_e, stats_f = {}, {}
            qe = trust_quantize(fwht(xe, block) if block else xe, bits, scale, trust, stats_e)
            qf = fused_rotate_quantize(xf, bits, scale, trust, block, stats_f)
            _same(qf, qe)
            qe.backward(g)
            qf.backward(g)
            _same(xf.grad, xe.grad)
            assert stats_f.keys() == stats_e.keys()
            for key in stats_e:
                _same(stats_f[key], stats_e[key])
            assert torch.isfinite(qf[1:]).all() and (xf.grad[1:] != 0).any()


def test_negative_controls_values_on_the_grid_and_the_mask_cuts_gradients():
    """What the equality above would miss if both paths were wrong the same way: the values are the 16 levels of
    the grid (not the rotated input), the straight-through gradient is the rotated-back incoming gradient, and the
    trust mask changes it (clipped entries get none)."""
    torch.manual_seed(1)
    x = torch.randn(64, 256) * 3
    g = torch.randn(64, 256)
    q = fused_rotate_quantize(x, 4, block=128)
    assert 2 < q[0].unique().numel() <= 16 and not torch.allclose(q, fwht(x, 128), atol=1e-2)
    grads = {}
    for trust in (None, 1.0):
        xr = x.clone().requires_grad_()
        fused_rotate_quantize(xr, 4, trust_scale=trust, block=128).backward(g)
        grads[trust] = xr.grad
    torch.testing.assert_close(grads[None], fwht(g, 128))  # H is symmetric: the adjoint is H itself
    assert not torch.allclose(grads[1.0], grads[None], atol=1e-3)


def test_fused_layer_equals_its_eager_reference_and_is_close_to_the_matmul_path():
    torch.manual_seed(2)
    lin = nn.Linear(256, 48)
    x = torch.randn(3, 7, 256)
    g = torch.randn(3, 7, 48)
    fused = QuestLinear.from_linear(lin, weight_bits=3, act_bits=4)
    xf = x.clone().requires_grad_()
    out = fused(xf)
    assert fused.last_path == "fused"
    out.backward(g)
    grads_f = [p.grad.clone() for p in (lin.weight, lin.bias)]
    for p in (lin.weight, lin.bias):
        p.grad = None
    xe = x.clone().requires_grad_()
    ref = F.linear(_eager(xe, 4, "gaussian", 1.0, 128), _eager(lin.weight, 3, "gaussian", 1.0, 128), lin.bias)
    ref.backward(g)
    _same(out, ref)
    _same(xf.grad, xe.grad)
    for got, p in zip(grads_f, (lin.weight, lin.bias)):
        _same(got, p.grad)
    # the eager layer rotates by the matmul, a few ulp apart: a row's step may move by an ulp, and a rare value
    # that sat within those ulp of a rounding boundary moves by one level
    eager = QuestLinear.from_linear(lin, weight_bits=3, act_bits=4, fused=False)
    assert eager(x).sub(out.detach()).abs().max() < 0.05 * out.abs().max()
    assert eager.last_path == "eager"
    x = torch.randn(512, 256)
    qf = fused_rotate_quantize(x, 4, block=128)
    qe = trust_quantize(block_hadamard(x, 128), 4)
    moved = ~torch.isclose(qf, qe, rtol=1e-5, atol=0)
    assert moved.float().mean() < 1e-3


def test_an_unquantized_input_gets_the_weights_rotation():
    """W4A16 on the fused path: the input is rotated by the same butterflies as the weight (bit for bit the eager
    fwht, forward and backward)."""
    torch.manual_seed(4)
    lin = nn.Linear(256, 16)
    layer = QuestLinear.from_linear(lin, weight_bits=4, act_bits=None)
    x, g = torch.randn(5, 256), torch.randn(5, 16)
    xf, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = layer(xf)
    out.backward(g)
    assert layer.last_path == "fused"
    ref = F.linear(fwht(xe, 128), _eager(lin.weight, 4, "gaussian", 1.0, 128).detach(), lin.bias)
    ref.backward(g)
    _same(out, ref)
    _same(xf.grad, xe.grad)


def test_export_of_a_fused_layer_repeats_its_forward():
    torch.manual_seed(3)
    layer = QuestLinear.from_linear(nn.Linear(256, 32), weight_bits=4, act_bits=4)
    x = torch.randn(10, 256)
    _same(layer.export()(x), layer(x).detach())


def test_default_falls_back_with_one_log_line_and_fused_true_refuses(caplog, monkeypatch):
    layer = QuestLinear.from_linear(nn.Linear(128, 8), weight_bits=4, act_bits=4)
    x = torch.randn(4, 128, dtype=torch.float64)
    layer.double()
    layer(x)
    assert layer.last_path == "fused"  # float64 is supported
    FusedPath.say_fallback_once.cache_clear()
    monkeypatch.setitem(quest_fused.PATH.__dict__, "_built", (None, "no C++ compiler ('c++' is not on PATH)"))
    with caplog.at_level(logging.WARNING, logger="lightning_ext.nn._fused_path"):
        for _ in range(3):
            layer(x)
    assert layer.last_path == "eager"
    lines = [r.getMessage() for r in caplog.records if "eager path runs instead" in r.getMessage()]
    assert len(lines) == 1 and "no C++ compiler" in lines[0]
    strict = QuestLinear.from_linear(nn.Linear(128, 8), fused=True)
    with pytest.raises(RuntimeError, match=r"fused=True.*no C\+\+ compiler"):
        strict(torch.randn(2, 128))


def test_bf16_input_runs_eagerly_and_fused_true_names_the_dtype():
    FusedPath.say_fallback_once.cache_clear()
    layer = QuestLinear.from_linear(nn.Linear(128, 8).bfloat16())
    layer(torch.randn(2, 128, dtype=torch.bfloat16))
    assert layer.last_path == "eager"
    layer.fused = True
    with pytest.raises(RuntimeError, match="float32/float64.*bfloat16"):
        layer(torch.randn(2, 128, dtype=torch.bfloat16))


def test_fused_argument_is_checked_where_it_is_given():
    with pytest.raises(ValueError, match="fused must be True or False or None"):
        QuEST(fused="yes")
    with pytest.raises(ValueError, match="fused must be True or False or None"):
        QuestLinear.from_linear(nn.Linear(128, 8), fused=1)
    assert all(layer.fused is False for layer in QuEST(fused=False, exclude=[]).prepare(
        nn.Sequential(nn.Linear(128, 128))).values())


def test_a_fit_with_the_callback_runs_the_fused_path_by_default(tmp_path):
    """What a user gets from the YAML/callback defaults: every quantized layer took the kernels."""
    import lightning.pytorch as pl

    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    torch.manual_seed(0)
    model = MLPClassifier(hidden=[128, 128], lr=1e-2)
    quest = QuEST(bits=4, targets=["net.2"], log_every=1)  # the 128 -> 128 hidden layer
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=[quest], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=16))
    assert quest.layers and {layer.last_path for layer in quest.layers.values()} == {"fused"}
    assert 0.5 < trainer.callback_metrics["quest/trust_fraction"] <= 1.0
