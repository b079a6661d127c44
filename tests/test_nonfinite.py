"""The non-finite guard (``lightning_ext.callbacks.NonFiniteGuard``, on by default): an optimizer step whose loss or
gradients are not finite is skipped on every rank alike, counted and logged; the fit stops after
``max_consecutive`` skips in a row.

**The NaN-sample experiment, every registry entry** (one process, 24 steps, sample 0 of step 9's batch NaN at the
input layer): the weights, the optimizer state and the technique state at the end are finite and **bit-identical**
to a run of 23 steps whose step-9 batch was removed. The one difference, by design: the guarded run's global step
counts the skipped step (as Lightning counts a step its GradScaler skips), so the reference's schedules keyed on
the global step start one step earlier (``harness.nonfinite_run``). On the previous main (no guard) every entry
ended with non-finite weights: the negative control below switches the guard off and sees it.

**2 processes** (DDP, DeepSpeed ZeRO-2 in fp32 and in bf16-mixed, where DeepSpeed's own gradient check is off
unless the guard turns it on, ZeRO-3 and FSDP2): the NaN sample is on rank 0 only; both ranks skip step 9 and end
bit-identical to the same strategy's run without that batch. An infinite gradient element that only rank 0 sees
(FSDP2: in its own shard) is skipped by both ranks; with each rank deciding alone (the negative control) they
part.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import InfGradient, PoisonStep, differences, nonfinite_run, rank_states, snapshot
from lightning_ext.callbacks import NonFiniteGuard
from lightning_ext.callbacks.nonfinite import ensure_guard
from registry import BY_NAME, REGISTRY, Entry

STEPS, AT = 24, 9  # after EVA's 8 calibration batches (read from the same loader); before every schedule switch
QUIET = dict(val_check_interval=None, limit_val_batches=0)


def _guard(trainer) -> NonFiniteGuard:
    return next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))


def _comparable(trainer) -> dict:
    """What must be untouched by the skip: weights, optimizer state, technique state (not the guard's count, the
    data position or the global step, which count the skipped batch)."""
    state = snapshot(trainer)
    state["callbacks"].pop(NonFiniteGuard.__qualname__, None)
    return {k: state[k] for k in ("model", "optimizers", "callbacks")}


def _finite(state: dict) -> bool:
    tensors = [v for v in state["model"].values() if v.is_floating_point()]
    for optimizer in state["optimizers"]:
        for per_param in optimizer["state"].values():
            tensors += [v for v in per_param.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return all(torch.isfinite(t).all() for t in tensors)


@pytest.mark.parametrize("entry", REGISTRY, ids=[e.name for e in REGISTRY])
def test_one_nan_sample_is_skipped_and_the_run_equals_the_run_without_it(tmp_path, entry):
    guarded = nonfinite_run(entry, tmp_path, STEPS, AT, reference=False, **QUIET)
    reference = nonfinite_run(entry, tmp_path, STEPS, AT, reference=True, **QUIET)
    poison = next(cb for cb in guarded.callbacks if isinstance(cb, PoisonStep))
    assert poison.hits >= 1  # the NaN went in (twice for CrAM: both passes)
    assert _guard(guarded).state_dict() == {"skipped": 1, "consecutive": 0, "last": [AT]}
    assert guarded.global_step == STEPS and reference.global_step == STEPS - 1
    state = _comparable(guarded)
    assert _finite(state)
    assert differences(state, _comparable(reference)) == []


@pytest.mark.parametrize("name", ["baseline_adamw", "cram", "reweighting"])
def test_without_the_guard_one_nan_sample_ruins_the_run(tmp_path, name):
    """The negative control: the guard off (as on the previous main), the same NaN sample leaves non-finite
    weights and optimizer state, silently."""
    trainer = nonfinite_run(BY_NAME[name], tmp_path, STEPS, AT, reference=False,
                            callbacks=[NonFiniteGuard(enabled=False)], **QUIET)
    assert not _finite(_comparable(trainer))


def _batchnorm_entry() -> Entry:
    from lightning_ext.models import MLPClassifier

    return dataclasses.replace(BY_NAME["baseline_adamw"], name="batchnorm",
                               model=lambda: MLPClassifier(hidden=[32], batch_norm=True, lr=1e-2))


def test_batchnorm_statistics_are_restored(tmp_path, monkeypatch):
    """The NaN batch went through BatchNorm's running statistics in the forward; the skip puts them back (and
    without that, they stay NaN: the negative control)."""
    entry = _batchnorm_entry()
    guarded = nonfinite_run(entry, tmp_path / "a", STEPS, AT, reference=False, **QUIET)
    reference = nonfinite_run(entry, tmp_path / "a", STEPS, AT, reference=True, **QUIET)
    assert differences(_comparable(guarded), _comparable(reference)) == []
    from lightning_ext.callbacks import nonfinite

    monkeypatch.setattr(nonfinite, "restore_running_stats", lambda kept: None)
    unrestored = nonfinite_run(entry, tmp_path / "b", STEPS, AT, reference=False, **QUIET)
    stats = [v for k, v in unrestored.lightning_module.state_dict().items() if "running_" in k]
    assert stats and not all(torch.isfinite(s).all() for s in stats)


def test_a_non_finite_gradient_under_a_finite_loss_is_skipped_too(tmp_path):
    entry = BY_NAME["adamp"]
    poison = InfGradient(AT)
    with pytest.warns(UserWarning, match="step 9: non-finite gradients "):
        guarded = nonfinite_run(entry, tmp_path, STEPS, AT, reference=False, callbacks=[poison], **QUIET)
    assert poison.hits == 1
    reference = nonfinite_run(entry, tmp_path, STEPS, AT, reference=True, **QUIET)
    assert differences(_comparable(guarded), _comparable(reference)) == []


def test_consecutive_skips_stop_the_fit_with_the_weights_of_before(tmp_path):
    """Every step from step 9 on is bad: the fit stops at the third skip, naming the steps, with the weights of
    step 9's start (equal to a clean run of 9 steps)."""
    entry = BY_NAME["baseline_adamw"]
    poison, guard = PoisonStep(AT, last=STEPS), NonFiniteGuard(max_consecutive=3)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row .*\(global steps \[9, 10, 11\]"):
        nonfinite_run(entry, tmp_path, STEPS, AT, reference=False, callbacks=[poison, guard], **QUIET)
    assert poison.hits == 3 and guard.state["skipped"] == 3
    clean = nonfinite_run(entry, tmp_path / "clean", AT + 1, AT + 1, reference=True, **QUIET)  # steps 0-8
    stopped = guard._trainer.lightning_module.state_dict()  # noqa: SLF001
    assert differences(stopped, clean.lightning_module.state_dict()) == []


def test_on_by_default_switchable_and_counted_in_the_checkpoint(tmp_path):
    import lightning.pytorch as pl

    from lightning_ext.callbacks import LossReweighting

    trainer = pl.Trainer(callbacks=[LossReweighting()], logger=False)
    trainer.callbacks[0].setup(trainer, torch.nn.Linear(2, 2), "validate")
    assert sum(isinstance(cb, NonFiniteGuard) for cb in trainer.callbacks) == 1
    off = NonFiniteGuard(enabled=False)
    trainer = pl.Trainer(callbacks=[off], logger=False)
    ensure_guard(trainer)
    assert [cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)] == [off]

    guarded = nonfinite_run(BY_NAME["baseline_adamw"], tmp_path, 12, AT, reference=False, **QUIET)
    guarded.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"][NonFiniteGuard.__qualname__]
    assert saved["skipped"] == 1
    fresh = NonFiniteGuard()
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == saved


#: 2 processes: (strategy, precision, entries)
SHARDED = [("ddp", "32-true", ["baseline_adamw", "cram", "reweighting"]),
           ("deepspeed_cpu_stage_2", "32-true", ["adamp", "cram", "lawn"]),
           ("deepspeed_cpu_stage_2", "bf16-mixed", ["baseline_adamw", "fadam"]),
           ("deepspeed_cpu_stage_3", "32-true", ["baseline_adamw", "cram"]),
           ("fsdp_cpu", "32-true", ["sgdp", "cram"])]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy, precision, names", SHARDED,
                         ids=[f"{s.removeprefix('deepspeed_cpu_')}-{p}" for s, p, _ in SHARDED])
def test_every_rank_skips_the_step_and_equals_the_run_without_it(launches, strategy, precision, names):
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    entries = [dataclasses.replace(BY_NAME[n], steps=16) for n in names]
    launch = launches.get(strategy, "nonfinite", entries, "--steps", "16", "--precision", precision)
    for entry in entries:
        r0, r1 = launch.states(entry)
        reference = rank_states(launch.out / entry.name / "reference", 2)
        for rank, (a, b) in enumerate(zip((r0, r1), reference)):
            assert a["callbacks"].pop(NonFiniteGuard.__qualname__) == {"skipped": 1, "consecutive": 0,
                                                                      "last": [AT]}, (entry.name, rank)
            b["callbacks"].pop(NonFiniteGuard.__qualname__, None)
            assert all(torch.isfinite(p).all() for p in a["params"].values())
            assert a["global_step"] == 16 and b["global_step"] == 15
            for key in ("params", "optimizer", "callbacks"):
                assert differences(a[key], b[key]) == [], (entry.name, rank, key)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp_cpu"])
def test_a_gradient_only_one_rank_sees_is_skipped_by_every_rank(launches, strategy):
    """An infinite gradient element on rank 0 only (under FSDP2 in rank 0's own shard), the loss finite everywhere:
    the verdict is all-reduced, so both ranks skip and end equal to the run without that batch. The negative
    control takes each rank's own verdict (no all-reduce): rank 0 skips, rank 1 steps, and the run ends away from
    the reference."""
    # torch AdamW: no collective inside its step (AdamP's statistics all-reduce there; with one rank skipping and
    # the other stepping, the control would deadlock)
    entry = dataclasses.replace(BY_NAME["baseline_adamw"], steps=16)
    for control in (False, True):
        extra = ("--steps", "16", "--poison", "gradient", *(["--local-verdict"] if control else []))
        launch = launches.get(strategy, "nonfinite", [entry], *extra)
        ranks = launch.states(entry)
        skipped = [r["callbacks"].pop(NonFiniteGuard.__qualname__)["skipped"] for r in ranks]
        reference = rank_states(launch.out / entry.name / "reference", 2)
        if control:
            assert skipped == [1, 0]  # rank 0 skipped, rank 1 stepped
            assert differences(ranks[0]["params"], reference[0]["params"]) != []
        else:
            assert skipped == [1, 1]
            for a, b in zip(ranks, reference):
                assert differences(a["params"], b["params"]) == [] and differences(a["optimizer"], b["optimizer"]) == []


def test_an_optimizer_that_evaluates_the_closure_itself_is_left_unguarded_with_a_warning(tmp_path):
    """The check cannot sit between LBFGS's closure calls and its update: the guard says so and claims nothing."""
    from registry import MLPWith

    entry = dataclasses.replace(BY_NAME["adamp"], name="lbfgs", model=lambda: MLPWith("torch.optim.LBFGS", lr=0.1))
    with pytest.warns(UserWarning, match="LBFGS evaluates the closure itself, so its steps are not guarded"):
        trainer = nonfinite_run(entry, tmp_path, 12, AT, reference=False, **QUIET)
    assert _guard(trainer).state_dict()["skipped"] == 0
