"""Loss reweighting (Sow et al., ICLR 2025): weight properties, the callback's loss and gradient,
2-process gloo = one process on the whole batch, clear errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.callbacks import LossReweighting
from lightning_ext.nn.reweighting import (normalize_losses, resolve_strategy, sample_weights, strategy_scores,
                                          weight_diagnostics)

LOSSES = torch.tensor([0.3, 2.5, 1.1, 0.9, 4.0, 0.05, 2.2, 1.7])


@pytest.mark.parametrize("strategy", ["linupper", "quadratic", "extremes", "uniform"])
def test_weights_are_a_distribution_even_for_equal_losses(strategy):
    for losses in (LOSSES, torch.full((5,), 1.3), torch.tensor([7.0])):
        w = sample_weights(losses.double(), strategy, r=0.4)
        assert w.dtype == torch.float32 and torch.isfinite(w).all() and (w >= 0).all()
        assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    same = sample_weights(torch.full((5,), 1.3), strategy, r=0.4)
    assert torch.allclose(same, torch.full((5,), 0.2))


def test_large_temperature_gives_uniform_weights():
    for strategy in ("linupper", "quadratic", "extremes"):
        assert torch.allclose(sample_weights(LOSSES, strategy, r=1e6), torch.full((8,), 1 / 8), atol=1e-7)
        assert torch.equal(sample_weights(LOSSES, strategy, r=math.inf), torch.full((8,), 1 / 8))


def test_strategy_shapes():
    order = LOSSES.argsort()
    lin = sample_weights(LOSSES, "linupper", r=0.4)[order]
    assert (lin[1:] >= lin[:-1]).all()  # monotone non-decreasing in the loss
    assert lin[-1] > 2 * lin[0]
    mid = (LOSSES.max() + LOSSES.min()) / 2
    above = LOSSES >= mid
    w = sample_weights(LOSSES, "linupper", r=0.4)
    assert torch.allclose(w[above], w[above][0].expand(int(above.sum())))  # flat above the mid-range
    xs = torch.linspace(0, 2, 21)  # mid-range at 1.0 (index 10)
    assert sample_weights(xs, "quadratic", r=0.4).argmax() == 10
    assert sample_weights(xs, "extremes", r=0.4).argmin() == 10
    normalized = normalize_losses(xs)
    assert normalized[0] == -1 and normalized[-1] == 1
    assert torch.equal(strategy_scores(normalized, "extremes"), normalized.abs())


def test_strategy_names_are_the_papers():
    assert resolve_strategy("LinUpper") == "linupper" and resolve_strategy("mid") == "quadratic"
    with pytest.raises(ValueError, match="'upper' is LinUpper in fms-fsdp but a plain linear ramp"):
        resolve_strategy("upper")
    with pytest.raises(ValueError, match="strategy must be one of"):
        LossReweighting(strategy="focal")


def test_padding_entries_take_no_part():
    padded = torch.cat([LOSSES, torch.full((3,), math.nan)])
    valid = torch.arange(11) < 8
    w = sample_weights(padded, "linupper", r=0.4, valid=valid)
    assert torch.equal(w[8:], torch.zeros(3)) and torch.allclose(w[:8], sample_weights(LOSSES, "linupper", r=0.4))


def test_diagnostics():
    n = len(LOSSES)
    uniform = weight_diagnostics(torch.full((n,), 1 / n), LOSSES)
    assert uniform["weight_entropy"].item() == pytest.approx(math.log(n))
    assert uniform["effective_sample_size"].item() == pytest.approx(n) and uniform["loss_weight_corr"] == 0
    lin = weight_diagnostics(sample_weights(LOSSES, "linupper", r=0.4), LOSSES)
    assert lin["effective_sample_size"] < n and lin["loss_weight_corr"] > 0.5


@pytest.mark.parametrize("kwargs, name", [({"r": 0.0}, "r"), ({"delta": -1.0}, "delta"),
                                          ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_r": 0.0}, "warmup_r")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        LossReweighting(**kwargs)


# -- the callback inside Lightning ----------------------------------------------------------------

def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class Tiny(pl.LightningModule):
    """Per-sample cross-entropy on a fixed 16-sample set; rank 1 may drop a sample (unequal batches)."""

    def __init__(self, drop_on_rank1: bool = False, per_sample: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(4, 3).double()
        self.drop_on_rank1, self.per_sample = drop_on_rank1, per_sample

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        if self.drop_on_rank1 and self.trainer.global_rank == 1:
            x, y, index = x[:-1], y[:-1], index[:-1]
        self.used = index.tolist()
        losses = F.cross_entropy(self.net(x), y, reduction="none")
        if not self.per_sample:
            return losses.mean()
        return {"loss": losses.mean(), "per_sample_loss": losses}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(*_data(), torch.arange(16)), batch_size=8, shuffle=False)


class SaveGrads(pl.Callback):
    def __init__(self, out=None):
        self.out, self.grads, self.outputs = out, None, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}
        if self.out is not None:
            torch.save({"grads": self.grads, "used": pl_module.used}, self.out / f"grads{trainer.global_rank}.pt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def _trainer(callbacks, **kw):
    settings = dict(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, precision="64-true")
    return pl.Trainer(callbacks=callbacks, **{**settings, **kw})


def _reference_grads(indices, strategy="linupper", r=0.4):
    model = Tiny()
    x, y = _data()
    losses = F.cross_entropy(model.net(x[indices]), y[indices], reduction="none")
    (sample_weights(losses, strategy, r).double() * losses).sum().backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_callback_returns_the_weighted_loss_and_its_gradient():
    saver = SaveGrads()
    _trainer([LossReweighting(strategy="linupper", r=0.4), saver]).fit(Tiny())
    expected = _reference_grads(list(range(8)))
    assert all(torch.allclose(saver.grads[n], expected[n], rtol=1e-12, atol=0) for n in expected)
    plain = SaveGrads()
    _trainer([plain]).fit(Tiny())
    assert any((plain.grads[n] - expected[n]).abs().max() > 1e-4 for n in expected)  # reweighting matters
    out = saver.outputs[0]
    assert not out["per_sample_loss"].requires_grad and out["sample_weights"].sum().item() == pytest.approx(1.0)


def test_warmup_is_uniform_then_reweights():
    cb = LossReweighting(warmup_steps=3)
    assert [cb.temperature(s) for s in (0, 2, 3)] == [math.inf, math.inf, 0.4]
    assert LossReweighting(warmup_steps=3, warmup_r=100.0).temperature(0) == 100.0
    saver = SaveGrads()
    _trainer([LossReweighting(warmup_steps=1), saver]).fit(Tiny())
    plain = SaveGrads()
    _trainer([plain]).fit(Tiny())
    assert all(torch.allclose(saver.grads[n], plain.grads[n], rtol=1e-12, atol=0) for n in plain.grads)


def test_missing_per_sample_loss_fails_at_the_first_step_naming_the_contract():
    with pytest.raises(TypeError, match=r"LossReweighting needs training_step to return a dict with "
                                        r"\['per_sample_loss'\].*per_sample_cross_entropy"):
        _trainer([LossReweighting()]).fit(Tiny(per_sample=False))


def test_manual_optimization_is_refused_at_setup():
    class Manual(Tiny):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="LossReweighting with manual optimization is not supported"):
        _trainer([LossReweighting()]).fit(Manual())


def test_training_step_is_restored_after_fit():
    model = Tiny()
    _trainer([LossReweighting()]).fit(model)
    assert "training_step" not in model.__dict__


@pytest.mark.distributed
@pytest.mark.parametrize("unequal", [False, True], ids=["equal", "unequal-batches"])
def test_two_ranks_give_the_single_process_gradient(unequal, tmp_path):
    """ddp_fork on gloo: each rank holds half the batch (rank 1 one sample fewer when unequal); after DDP's
    gradient averaging the gradient equals one process reweighting the union of the samples."""
    trainer = _trainer([LossReweighting(strategy="linupper", r=0.4), SaveGrads(tmp_path)], strategy="ddp_fork",
                       devices=2)
    trainer.fit(Tiny(drop_on_rank1=unequal))
    (g0, used0), (g1, used1) = ((d["grads"], d["used"]) for d in (torch.load(tmp_path / f"grads{r}.pt")
                                                                    for r in (0, 1)))
    assert (len(used0), len(used1)) == ((8, 7) if unequal else (8, 8)) and not set(used0) & set(used1)
    expected = _reference_grads(used0 + used1)
    for name, ref in expected.items():
        assert torch.equal(g0[name], g1[name])
        assert ((g0[name] - ref).norm() / ref.norm()).item() <= 1e-6
