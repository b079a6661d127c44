"""Paper claims of the optimizers, on paired seeds (lightning_ext/claims/ holds the full runs)."""

from __future__ import annotations


import pytest




@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_adamp_stops_norm_growth_of_scale_invariant_weights(seed):
    from lightning_ext.claims.adamp import run

    adamw, adamp = run("AdamW", seed), run("AdamP", seed)
    for layer in ("w1_ratio", "w2_ratio"):
        assert adamp[layer] < 1.15, (layer, adamp)
        assert adamw[layer] > 1.25, (layer, adamw)
    # accuracy is not the claim (differences on digits are seed noise); both must have learned
    assert adamp["acc"] > 0.9 and adamw["acc"] > 0.9


@pytest.mark.slow
def test_cram_plus_survives_one_shot_pruning_that_breaks_sgd():
    """Paired seed, BN network + BN re-calibration (the spec's robust setting)."""
    from lightning_ext.claims.cram import train

    sgd = train("SGD", seed=0, bn=True, epochs=30, rho=0.1)
    cram = train("CrAM+", seed=0, bn=True, epochs=30, rho=0.1)
    assert cram[0.95] > sgd[0.95] + 0.1, (sgd, cram)
    assert cram[0.9] >= sgd[0.9], (sgd, cram)
    assert cram[0.0] >= sgd[0.0] - 0.01, (sgd, cram)  # the dense model stays as good
