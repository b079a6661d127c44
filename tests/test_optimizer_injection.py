"""Optimizer-wrapping callbacks inject into ``configure_optimizers`` for one fit and undo it in ``teardown``."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_ext.callbacks import LAWN, CrAM, WeightCompander
from lightning_ext.data import DigitsDataModule
from lightning_ext.models import MLPClassifier
from lightning_ext.optimizers import CrAM as CrAMOptimizer
from lightning_ext.optimizers import LAWN as LAWNOptimizer


def _fit(model, callbacks, steps=2):
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return trainer


def test_a_module_fitted_twice_is_wrapped_afresh_by_the_new_callback():
    """The second fit's optimizer is wrapped once, by the second callback: not LAWN around LAWN, and not
    registered with the first (stale) callback. After each fit the module's own method is back."""
    model = MLPClassifier(hidden=[16])
    first = LAWN(free_steps=1, layers=["net.2"])
    trainer = _fit(model, [first])
    assert len(first.optimizers) == 1 and "configure_optimizers" not in model.__dict__
    assert isinstance(model.configure_optimizers(), torch.optim.Optimizer)
    assert not isinstance(model.configure_optimizers(), LAWNOptimizer)
    second = LAWN(free_steps=1, layers=["net.2"])
    trainer = _fit(model, [second])
    (opt,) = trainer.optimizers
    assert isinstance(opt, LAWNOptimizer) and not isinstance(opt.base, LAWNOptimizer)
    assert second.optimizers == [opt] and len(first.optimizers) == 1
    assert "configure_optimizers" not in model.__dict__


def test_stacked_wrappers_undo_in_any_teardown_order():
    model = MLPClassifier(hidden=[16])
    lawn, cram = LAWN(free_steps=1, layers=["net.2"]), CrAM(sparsities=[0.5])
    trainer = _fit(model, [lawn, cram])
    (opt,) = trainer.optimizers
    assert isinstance(opt, CrAMOptimizer) and isinstance(opt.base, LAWNOptimizer)  # the first injected is inner
    assert "configure_optimizers" not in model.__dict__
    trainer = _fit(model, [LAWN(free_steps=1, layers=["net.2"])])
    assert isinstance(trainer.optimizers[0], LAWNOptimizer)
    assert not isinstance(trainer.optimizers[0].base, (LAWNOptimizer, CrAMOptimizer))


def test_compander_adds_its_group_once_per_fit():
    model = MLPClassifier(hidden=[16])
    for _ in range(2):
        trainer = _fit(model, [WeightCompander(log_every=0)])
        assert len(trainer.optimizers[0].param_groups) == 2  # the module's group + the companders' α, β


def test_a_wrapper_whose_tensors_no_optimizer_holds_refuses_instead_of_vanishing():
    """A wrapper is never silently left out: when configure_optimizers leaves its layer out, the fit stops at setup
    (before, LAWN returned the optimizer unwrapped and the run trained without it)."""
    import pytest

    class HeadOnly(MLPClassifier):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.net[0].parameters(), lr=1e-2)  # the hidden layer only, not net.2

    model = HeadOnly(hidden=[16])
    with pytest.raises(RuntimeError, match=r"LAWN: no optimizer holds the tensors it acts on"):
        _fit(model, [LAWN(free_steps=1, layers=["net.2"])])
