"""Gradient accumulation: ``accumulate_grad_batches=2`` computes what one step on the doubled batch computes.

For every registry entry, a run accumulating 2 micro-batches per step ends within ``test_ranks.TOLERANCE`` of a
run whose batch is the two micro-batches together, in the same data order. Both runs see whole steps only: each
epoch is cut to an even number of micro-batches (``limit_train_batches``), as Lightning otherwise steps on the
odd micro-batch left at an epoch's end. LossReweighting is the documented exception: its softmax weights are
normalised over each micro-batch (what the loss of that micro-batch sees), so it is tested as such — equal to
the doubled batch during its uniform warm-up, different once reweighting starts. An entry whose registry
``accumulation`` is a message refuses the setting at setup.
"""

from __future__ import annotations

import dataclasses

import pytest

from harness import accumulation_settings, fit, worst_difference
from registry import BY_NAME, REGISTRY
from test_ranks import TOLERANCE

PER_MICRO_BATCH = {"reweighting"}


def _accumulated_and_doubled(entry, root):
    settings = accumulation_settings(entry, 1, 2)  # an even number of micro-batches per epoch
    kw = {"precision": entry.equality_precision, "val_check_interval": None, "limit_val_batches": 0}
    accumulated = fit(entry, root / "accumulated", entry.steps, **settings, **kw)
    doubled = fit(entry, root / "doubled", entry.steps, batch_scale=2,
                  limit_train_batches=settings["limit_train_batches"] // 2, **kw)
    params = [{n: p.detach() for n, p in t.lightning_module.named_parameters()} for t in (accumulated, doubled)]
    assert accumulated.global_step == doubled.global_step == entry.steps
    return worst_difference(*params)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.name not in PER_MICRO_BATCH], ids=lambda e: e.name)
def test_two_accumulated_micro_batches_equal_one_doubled_batch(entry, tmp_path):
    if entry.accumulation != "equal":  # refused at setup, before any step, naming the technique and the setting
        with pytest.raises(RuntimeError, match=entry.accumulation):
            _accumulated_and_doubled(entry, tmp_path)
        return
    worst = _accumulated_and_doubled(entry, tmp_path)
    assert worst < TOLERANCE, f"max |accumulated - doubled| {worst:.3e}"


def test_reweighting_normalises_per_micro_batch(tmp_path):
    entry = BY_NAME["reweighting"]  # uniform weights for 20 steps, then softmax over each micro-batch's losses
    assert _accumulated_and_doubled(dataclasses.replace(entry, steps=20), tmp_path / "warmup") < TOLERANCE
    assert _accumulated_and_doubled(entry, tmp_path / "reweighted") > 100 * TOLERANCE
