"""2 processes on CPU (gloo, ddp_fork) compute what one process computes.

Each registry entry trains 2 ranks of the per-process batch and, separately, one process on the global batch
(2 × that batch) in the same data order (``harness.one_process_parameters``). The ranks must end identical to
each other (weights and technique state, bit for bit) and equal to the one process within ``TOLERANCE``.
The floor is torch AdamW in the same harness (the ``baseline_adamw`` entry): ~1e-7 in fp32 on CPU, from the
different reduction order of a mean over 64 samples versus two means over 32 averaged by the all-reduce.
Measured per entry (fp32, 30 steps): 2e-8 to 6e-7; QuEST is compared in float64 (registry: rounding flips).
The negative control makes LossReweighting rank-local and must fail the same comparison.
"""

from __future__ import annotations

import pytest
import torch

from harness import ddp_rank_states, differences, initial_parameters, one_process_parameters, worst_difference
from registry import BY_NAME, REGISTRY, VARIANTS

TOLERANCE = 1e-5
FLOOR = 1e-6  # torch AdamW (baseline_adamw) must stay below this: the margin the tolerance leaves


@pytest.mark.distributed
@pytest.mark.parametrize("entry", REGISTRY + VARIANTS, ids=lambda e: e.name)
def test_two_ranks_agree_and_equal_one_process(entry, tmp_path):
    precision = {"precision": entry.equality_precision}
    r0, r1 = ddp_rank_states(entry, tmp_path, **precision)
    assert r0["world_size"] == 2 and r0["global_step"] == entry.steps
    assert differences(r0, r1) == []
    one = one_process_parameters(entry, tmp_path / "one", 2, **precision)
    worst = worst_difference(r0["params"], one)
    assert worst < (FLOOR if entry.name == "baseline_adamw" else TOLERANCE), f"max |2 ranks - one process| {worst:.3e}"
    # and training happened: weights moved away from their initial values
    reference = initial_parameters(entry, tmp_path / "initial", **precision)
    common = [n for n in reference if n in r0["params"]]
    assert common and any(not torch.equal(r0["params"][n], reference[n]) for n in common)


@pytest.mark.distributed
def test_a_rank_local_technique_fails_the_one_process_comparison(tmp_path, monkeypatch):
    """Negative control: LossReweighting normalising its softmax weights over each rank's own losses (no
    all-gather of the losses). DDP still averages the gradients, so the ranks agree — on another algorithm:
    rank 0 must miss the one-process result by far more than TOLERANCE once reweighting starts (step 20 of 30)."""
    from lightning_ext.callbacks import reweighting

    monkeypatch.setattr(reweighting, "gather_losses", lambda trainer, local: (local, None, 0))
    entry = BY_NAME["reweighting"]
    r0, r1 = ddp_rank_states(entry, tmp_path)  # forked after the patch: both ranks use it
    assert differences(r0["params"], r1["params"]) == []
    monkeypatch.undo()
    one = one_process_parameters(entry, tmp_path / "one", 2)
    assert worst_difference(r0["params"], one) > 100 * TOLERANCE


@pytest.mark.distributed
def test_a_two_rank_checkpoint_resumes_on_one_process(tmp_path):
    """2 → 1: a checkpoint written mid-epoch by 2 DDP ranks resumes on one process with the global batch and
    ends where the one-process run that never stopped ends (the data position converts: the ranks consumed the
    first k × b × 2 samples of the epoch's permutation, one process skips k batches of 2b). A layout whose
    global batch does not divide the consumed samples is refused, naming both."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from harness import fit

    entry = BY_NAME["baseline_adamw"]
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="stop", every_n_train_steps=entry.resume_at,
                            save_top_k=-1)
    fit(entry, tmp_path / "ranks", entry.resume_at, callbacks=[saver], enable_checkpointing=True,
        strategy="ddp_fork", devices=2)
    ckpt = str(tmp_path / "ckpt" / "stop.ckpt")
    resumed = fit(entry, tmp_path / "resumed", entry.steps, ckpt_path=ckpt, batch_scale=2)
    params = {n: p.detach() for n, p in resumed.lightning_module.named_parameters()}
    assert worst_difference(params, one_process_parameters(entry, tmp_path / "one", 2)) < TOLERANCE
    b = entry.data().batch_size  # the step is in epoch 1 there: one batch consumed per rank, 2b samples
    with pytest.raises(ValueError, match=rf"of {b} on each of 2 processes.*batches of {3 * b} on 1 processes"):
        fit(entry, tmp_path / "odd", entry.steps, ckpt_path=ckpt, batch_scale=3)
