"""OneBit: sign packing, the layer's formula, SVID, surrogate gradient, export, callback and distillation."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_ext.callbacks import OneBit
from lightning_ext.nn.onebit import (OneBitLinear, OneBitPacked, distillation_loss, pack_signs, sign_pm1, svid,
                                     unpack_signs)


def test_sign_packing_round_trip_with_zero_as_plus_one():
    w = torch.randn(37, 29)
    w[0, :5] = 0.0
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.numel() == (37 * 29 + 7) // 8
    signs = unpack_signs(packed, w.shape)
    assert torch.equal(signs, sign_pm1(w)) and (signs[0, :5] == 1).all()


def test_forward_is_the_formula_and_average_bits():
    torch.manual_seed(0)
    layer = OneBitLinear.from_linear(nn.Linear(64, 48, bias=False).double())
    x = torch.randn(5, 7, 64, dtype=torch.float64)
    y = ((x * layer.g) @ torch.where(layer.weight >= 0, 1.0, -1.0).double().t()) * layer.h
    torch.testing.assert_close(layer(x), nn.functional.layer_norm(y, (48,)), rtol=1e-10, atol=1e-10)
    assert layer.average_bits == pytest.approx(1 + 16 * (64 + 48) / (64 * 48))
    packed = layer.export()
    assert isinstance(packed, OneBitPacked) and not list(packed.parameters())
    assert torch.equal(packed(x), layer(x))


def test_svid_svd_equals_nmf_optimum_and_beats_naive():
    torch.manual_seed(0)
    w = torch.randn(96, 64, dtype=torch.float64) * torch.rand(96, 1, dtype=torch.float64)  # row scales
    a = w.abs()

    def err(h, g):
        return float((a - torch.outer(h, g)).norm() / a.norm())

    svd, nmf, naive = err(*svid(w, "svd")), err(*svid(w, "nmf", iters=500)), err(*svid(w, "naive"))
    assert svd == pytest.approx(nmf, abs=1e-3) and svd < naive
    h, g = svid(w, "svd")
    assert (h >= 0).all() and (g >= 0).all()
    sklearn = pytest.importorskip("sklearn.decomposition")
    model = sklearn.NMF(n_components=1, init="random", random_state=0, max_iter=2000, tol=1e-10)
    wh = model.fit_transform(a.numpy())
    reference = float((a - torch.tensor(wh @ model.components_)).norm() / a.norm())
    assert svd == pytest.approx(reference, abs=1e-3)


def test_latent_reset_and_surrogate_gradient():
    lin = nn.Linear(16, 8).double()
    layer = OneBitLinear.from_linear(lin, latent_scale=0.01, layer_norm=False)
    assert torch.equal(layer.weight, sign_pm1(lin.weight) * 0.01)
    layer.weight.data.normal_()
    x = torch.randn(4, 16, dtype=torch.float64)
    layer(x).sum().backward()
    upstream = ((torch.ones(4, 8, dtype=torch.float64) * layer.h).t() @ (x * layer.g))
    torch.testing.assert_close(layer.weight.grad, upstream * (1.001 - torch.tanh(layer.weight.detach()) ** 2))


def test_distillation_loss_terms():
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    out = distillation_loss(s, t, [torch.randn(2, 3, 4)], [torch.randn(2, 3, 4)], kl_weight=2.0, mse_weight=0.5)
    kl = nn.functional.kl_div(s.log_softmax(-1).flatten(0, 1), t.log_softmax(-1).flatten(0, 1), log_target=True,
                              reduction="batchmean")  # per token
    torch.testing.assert_close(out["kl"], kl)
    assert float(out["loss"]) == pytest.approx(2 * float(out["kl"]) + 0.5 * float(out["mse"]), rel=1e-6)
    same = distillation_loss(s, s, [t], [t * 3.0])  # scale-free hidden term, zero KL
    assert float(same["kl"]) == pytest.approx(0.0, abs=1e-6) and float(same["mse"]) == pytest.approx(0.0, abs=1e-6)


class _Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(8, 64)
        self.blocks = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :5].argmax(1)), batch_size=32)


def test_callback_distills_toward_the_frozen_teacher(tmp_path):
    model = _Net()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp_logits = model(x)
    cb = OneBit(targets=["blocks.0", "blocks.2"], freeze=["embed", "head"], hidden_modules=["blocks.1"])
    trainer = pl.Trainer(max_steps=40, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    cb_start = OneBit(targets=["blocks.0", "blocks.2"])
    start = _Net()
    cb_start.prepare(start)
    with torch.no_grad():
        kl_start = float(distillation_loss(start(x), fp_logits)["kl"])
    trainer.fit(model, _data())
    assert isinstance(model.blocks[0], OneBitLinear) and type(model.head) is nn.Linear
    assert not model.head.weight.requires_grad and not model.embed.weight.requires_grad
    assert not any("teacher" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(cb.teacher(x), fp_logits)  # the teacher is the untouched full-precision model
        kl_end = float(distillation_loss(model(x), fp_logits)["kl"])
    assert kl_end < 0.5 * kl_start, (kl_start, kl_end)
    assert "onebit/kl" in trainer.callback_metrics and float(trainer.callback_metrics["onebit/mse"]) > 0


def test_resume_builds_structure_without_svid_and_bad_args():
    model = _Net()
    layers = OneBit(targets=["blocks.0"]).prepare(model, init=False)
    assert torch.equal(layers["blocks.0"].g, torch.ones(64))  # not SVID: the checkpoint fills it
    with pytest.raises(ValueError, match="init must be one of"):
        OneBit(init="pca")
    with pytest.raises(ValueError, match="nothing to train on"):
        OneBit(kl_weight=0, mse_weight=0, ce_weight=0)


def test_training_step_that_bypasses_the_module_is_refused(tmp_path):
    class Bypass(_Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.head(self.blocks(self.embed(x))), y)

    trainer = pl.Trainer(max_steps=1, callbacks=[OneBit(targets=["blocks.0"])], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="did not call the distilled module"):
        trainer.fit(Bypass(), _data())
