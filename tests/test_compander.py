"""Weight compander: the stated properties for every compander, gradcheck, loading, export, param group."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_ext.callbacks import WeightCompander
from lightning_ext.nn.compander import (AsinhCompander, TanhCompander, apply_compander, compander_parameters,
                                        remove_compander)
from lightning_ext.surgery import SurgeryError

COMPANDERS = [AsinhCompander, TanhCompander]


def _randomized(cls, seed):
    g = torch.Generator().manual_seed(seed)
    comp = cls(alpha=float(torch.rand((), generator=g)) * 2 + 0.05, beta=1.01 + float(torch.rand((), generator=g)) * 3)
    with torch.no_grad():  # the properties must hold wherever the optimizer takes the raw hyper-parameters
        comp.a.add_(torch.randn((), generator=g) * 3)
        comp.b.add_(torch.randn((), generator=g) * 3)
    return comp.double()


@pytest.mark.parametrize("cls", COMPANDERS)
@pytest.mark.parametrize("seed", range(5))
def test_properties_hold_for_any_hyperparameters(cls, seed):
    comp = _randomized(cls, seed)
    alpha, beta = float(comp.alpha.detach()), float(comp.beta.detach())
    v = torch.linspace(-50 * alpha, 50 * alpha, 20001, dtype=torch.float64)
    with torch.no_grad():
        w = comp(v)
    torch.testing.assert_close(comp(-v).detach(), -w, rtol=0, atol=0)  # odd
    assert (w.diff() > 0).all() or cls is TanhCompander and (w.diff() >= 0).all()  # increasing
    h = 1e-6
    slope0 = float((comp(torch.tensor([h], dtype=torch.float64)) - comp(torch.tensor([-h], dtype=torch.float64))) / (2 * h))
    assert slope0 == pytest.approx(beta, rel=1e-6) and slope0 > 1  # expansion at 0
    big = torch.tensor([10 * alpha, 100 * alpha, 1000 * alpha], dtype=torch.float64)
    ratio = (comp(big) / big).detach()
    assert (ratio.diff() < 0).all() and ratio[-1] < 0.05 * beta  # compression: f(v)/v -> 0
    inside = torch.linspace(-0.9 * alpha, 0.9 * alpha, 101, dtype=torch.float64)
    torch.testing.assert_close(comp(comp.right_inverse(inside)).detach(), inside, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cls", COMPANDERS)
def test_gradcheck_including_hyperparameters(cls):
    comp = _randomized(cls, 0)
    v = torch.randn(7, dtype=torch.float64, requires_grad=True) * float(comp.alpha.detach())
    a, b = comp.a.detach().clone().requires_grad_(), comp.b.detach().clone().requires_grad_()

    def f(v, a, b):  # the module's own function, through the same softplus parameterization
        return comp.function(v, nn.functional.softplus(a), 1 + nn.functional.softplus(b))

    assert torch.autograd.gradcheck(f, (v.detach().requires_grad_(), a, b))


def test_hyperparameter_gradients_reach_the_module_parameters():
    comp = AsinhCompander(alpha=0.5, beta=2.0).double()
    comp(torch.randn(5, dtype=torch.float64)).pow(2).sum().backward()
    assert comp.a.grad is not None and comp.b.grad is not None and comp.a.grad != 0 and comp.b.grad != 0


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 3))


class _Reshape(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


def test_apply_keeps_outputs_then_export_gives_a_plain_model():
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), _Reshape(), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(28, 3))
    x = torch.randn(4, 8)
    before = net(x)
    comps = apply_compander(net)
    assert set(comps) == {"0", "3", "5"}
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)  # right_inverse: pretrained weights load
    keys = set(net.state_dict())
    assert "0.parametrizations.weight.original" in keys and "0.parametrizations.weight.0.a" in keys
    assert "0.bias" in keys and "0.weight" not in keys
    with torch.no_grad():  # training moves the hyper-parameters: w changes through f
        for c in comps.values():
            c.b.add_(0.5)
    moved = net(x).detach()
    assert not torch.allclose(moved, before, atol=1e-4)
    assert remove_compander(net) == ["0", "3", "5"]
    assert set(net.state_dict()) == {"0.weight", "0.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    torch.testing.assert_close(net(x), moved, rtol=1e-6, atol=1e-6)


def test_bounded_compander_refuses_weights_it_cannot_represent_and_changes_nothing():
    net = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 3))
    with torch.no_grad():
        net[1].weight[0, 0] = 100.0
    with pytest.raises(SurgeryError, match="outside its range"):
        apply_compander(net, compander=TanhCompander, compander_args={"alpha_scale": 2.0})
    assert not any(hasattr(m, "parametrizations") for m in net)  # all or nothing
    with pytest.raises(ValueError, match="beta"):
        AsinhCompander(beta=0.9)
    with pytest.raises(ValueError, match="cannot import"):
        WeightCompander(compander="lightning_ext.nn.compander.Nope")


class _Model(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


def test_callback_puts_hyperparameters_in_their_own_group_and_learns_them(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :3].argmax(1)), batch_size=16)
    model, cb = _Model(), WeightCompander(hyper_lr=5e-2, log_every=1)
    trainer = pl.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    start = {n: (float(c.alpha), float(c.beta)) for n, c in cb.prepare(model).items()}
    trainer.fit(model, data)
    opt = trainer.optimizers[0]
    hyper = {id(p) for p in compander_parameters(model)}
    assert len(hyper) == 4
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert {id(p) for p in opt.param_groups[1]["params"]} == hyper and opt.param_groups[1]["lr"] == 5e-2
    assert not hyper & {id(p) for p in opt.param_groups[0]["params"]}
    end = {n: (float(c.alpha), float(c.beta)) for n, c in cb.companders.items()}
    assert all(end[n] != start[n] for n in start)  # learned
    for key in ("compander/alpha", "compander/beta", "compander/small_weight_fraction"):
        assert key in trainer.callback_metrics
