"""Resume is exact: stop mid-epoch, resume from the checkpoint, end bit-identical."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest

from harness import resume_differences
from lightning_ext.callbacks import Technique
from registry import REGISTRY, Entry


@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_resume_is_exact(entry, tmp_path):
    assert resume_differences(entry, tmp_path) == []


class _LRRamp(Technique):
    """Scales the learning rate by a step counter: state that a resume must restore."""

    def __init__(self, rate: float = 0.05) -> None:
        super().__init__()
        self.rate = rate
        self.state = {"count": 0}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        for group in trainer.optimizers[0].param_groups:
            group["lr"] = 1e-2 * (1 + self.rate * self.state["count"])
        self.state["count"] += 1


class _LRRampUnsaved(_LRRamp):
    """The same callback with the classic bug: its counter is not saved."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


@pytest.mark.parametrize("cls, broken", [(_LRRamp, False), (_LRRampUnsaved, True)])
def test_resume_check_catches_unsaved_state(cls, broken, tmp_path):
    """The harness must fail a callback that forgets its state, and pass the same one that saves it."""
    base = REGISTRY[0]
    entry = Entry(name=f"ramp_{cls.__name__}", model=base.model, data=base.data, callbacks=lambda: [cls()])
    diffs = resume_differences(entry, tmp_path)
    if broken:
        assert any(d.startswith("/model/") for d in diffs), diffs
        assert any("lr" in d for d in diffs), diffs
    else:
        assert diffs == []


def test_datamodule_resume_continues_the_epoch(tmp_path):
    """Mid-epoch resume trains on the batches a straight run would (the sampler skips consumed ones)."""
    from lightning_ext.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    full = list(iter(dm.train_dataloader()))
    dm.load_state_dict({"epoch": 0, "consumed_batches": 7})
    rest = list(iter(dm.train_dataloader()))
    assert len(rest) == len(full) - 7
    for (x1, y1), (x2, y2) in zip(full[7:], rest):
        assert (x1 == x2).all() and (y1 == y2).all()
    # a new epoch is a new permutation and starts from its first batch
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    epoch1 = list(iter(loader))
    assert len(epoch1) == len(full) and not (epoch1[0][1] == full[0][1]).all()
