"""QuEST's claims on a paired seed (lightning_ext/claims/quest.py holds the full run and its table)."""

from __future__ import annotations


import pytest




@pytest.mark.slow
def test_w4a4_near_full_precision_and_w1a1_quest_beats_absmax_ste():
    """Robust parts (full run: W4A4 +0.020 bpc, W1A1 QuEST 0.22 bpc better than absmax-STE, 2 seeds x 500
    steps): W4A4 within 0.04 bpc of FP32 and W1A1 QuEST at least 0.1 bpc below absmax-STE; switching QuEST's
    pieces off (the absmax-STE setting) is what loses."""
    from lightning_ext.claims.quest import run

    r = run(seeds=1, steps=400, settings=["FP32", "W4A4 QuEST", "W1A1 QuEST", "W1A1 absmax-STE"])
    fp, w4, w1, w1_absmax = (r[k][0] for k in ("FP32", "W4A4 QuEST", "W1A1 QuEST", "W1A1 absmax-STE"))
    assert abs(w4 - fp) < 0.04, r
    assert w1 < w1_absmax - 0.1, r
    assert w1 > fp + 0.03, r  # 1 bit does cost something: the quantizer was on
