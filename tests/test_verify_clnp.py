"""CLNP's claim on split digits (lightning_ext/claims/clnp.py holds the full run)."""

from __future__ import annotations


import pytest




@pytest.mark.slow
def test_clnp_never_forgets_and_sparsity_keeps_capacity():
    from lightning_ext.claims.clnp import run

    clnp, naive = run("CLNP", seed=0), run("naive", seed=0)
    assert clnp["identical"] and all(clnp["identical"])  # every old head bit-identical after every later task
    assert clnp["final"] == clnp["just_trained"]
    assert not all(naive["identical"])  # the same schedule without CLNP moves old outputs
    assert 0.96 <= clnp["mean"] <= 0.995, clnp["final"]
    frees = [h["layers"][1]["free"] for h in clnp["history"]]
    assert all(a >= b for a, b in zip(frees, frees[1:]))
    dense = run("CLNP", seed=0, l1=0.0)
    assert clnp["history"][-1]["layers"][1]["free"] > dense["history"][-1]["layers"][1]["free"]
