"""Ranks agree: 2 processes on CPU (gloo, ddp_fork) end with identical weights and technique state."""

from __future__ import annotations

import pytest
import torch

from harness import DumpRankState, differences, fit, initial_parameters, rank_states
from registry import REGISTRY


@pytest.mark.distributed
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_ranks_agree(entry, tmp_path):
    reference = initial_parameters(entry, tmp_path / "initial")  # what fit() starts training from
    fit(entry, tmp_path, entry.steps, callbacks=[DumpRankState(tmp_path / "ranks")], strategy="ddp_fork",
        devices=2)
    r0, r1 = rank_states(tmp_path / "ranks", 2)
    assert r0["world_size"] == 2 and r0["global_step"] == entry.steps
    assert differences(r0, r1) == []
    # and training happened: weights moved away from their initial values
    common = [n for n in reference if n in r0["params"]]
    assert common and any(not torch.equal(r0["params"][n], reference[n]) for n in common)
