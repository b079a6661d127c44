"""Ranks agree: 2 processes on CPU (gloo, ddp_fork) end with identical weights and technique state."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from harness import DumpRankState, differences, fit, rank_states
from registry import REGISTRY


@pytest.mark.distributed
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_ranks_agree(entry, tmp_path):
    pl.seed_everything(0, verbose=False)  # the same initial weights fit() starts from
    reference = {n: p.detach().clone() for n, p in entry.model().named_parameters()}
    fit(entry, tmp_path, entry.steps, callbacks=[DumpRankState(tmp_path / "ranks")], strategy="ddp_fork",
        devices=2)
    r0, r1 = rank_states(tmp_path / "ranks", 2)
    assert r0["world_size"] == 2 and r0["global_step"] == entry.steps
    assert differences(r0, r1) == []
    # and training happened: weights moved away from their (seeded) initial values (names a
    # reparameterization renames, e.g. the compander's, are not compared)
    common = [n for n in reference if n in r0["params"]]
    assert common and any(not torch.equal(r0["params"][n], reference[n]) for n in common)
