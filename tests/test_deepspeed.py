"""DeepSpeed ZeRO 1/2/3 on CPU (2 processes, gloo): each technique trains and computes what one process computes
on the global batch (the full fp32 weights, gathered, within ``test_ranks.TOLERANCE`` of the one-process
run; QuEST, whose fp32 rounding flips part any two reduction orders, against the fp32 DDP run), or
is refused at setup with a message naming the stage — never a silent wrong result. Under ZeRO-2 and ZeRO-3 a
run killed with SIGKILL right after a checkpoint resumes bit-identical to the run that never stopped.

One launch of 2 processes per stage trains every entry (``harness.Launches``; the stop and resume launches
likewise), instead of one launch per entry and stage."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from harness import (differences, one_process_parameters, refusal_of, resume_difference, sharded_difference,
                     worst_difference)
from registry import BY_NAME, REGISTRY
from test_ranks import TOLERANCE

pytest.importorskip("deepspeed")

CASES = [(e, stage) for e in REGISTRY for stage in (1, 2, 3)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry, stage", CASES, ids=[f"{e.name}-zero{s}" for e, s in CASES])
def test_deepspeed_cpu(entry, stage, tmp_path, launches):
    # the first DeepSpeed use on a machine JIT-compiles a communication extension (~35 s-2 min)
    launch = launches.get(f"deepspeed_cpu_stage_{stage}")
    expected = entry.deepspeed[stage]
    if expected == "train":
        worst = sharded_difference(entry, launch, tmp_path)
        assert worst < TOLERANCE, f"max |ZeRO-{stage} - {entry.sharded_reference}| {worst:.3e}"
    else:
        assert f"stage {stage}" in refusal_of(launch, entry, expected).lower()


def _trained(stage: int) -> list:
    return [e for e in REGISTRY if e.deepspeed[stage] == "train"]


RESUMED = [(e, stage) for stage in (2, 3) for e in _trained(stage)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry, stage", RESUMED, ids=[f"{e.name}-zero{s}" for e, s in RESUMED])
def test_zero_resume_after_sigkill_is_exact(entry, stage, launches):
    """Killed with SIGKILL right after the step-``resume_at`` checkpoint (DeepSpeed's checkpoint folder, one
    partition file per rank), resumed on 2 processes: each rank ends bit-identical to the run that never stopped —
    weights, its fp32 master partition and optimizer state (ZeRO-3: the parameters' padding excepted, which
    DeepSpeed leaves uninitialised), technique state, global step and data position."""
    strategy = f"deepspeed_cpu_stage_{stage}"
    assert resume_difference(entry, launches, strategy, _trained(stage)) == []


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["adamp", "cram"])
def test_a_shard_local_optimizer_fails_the_one_process_comparison(tmp_path, launches, name):
    """Negative controls of the cells above: AdamP under ZeRO-2 with its per-row statistics left shard-local
    (no all-reduce), and CrAM perturbing with its own gradient fragments only and keeping its rank's pass-2
    gradient, still train with agreeing ranks — and miss the one-process run by far more than TOLERANCE."""
    entry = BY_NAME[name]
    r0, r1 = launches.get("deepspeed_cpu_stage_2", "straight", [BY_NAME["adamp"], BY_NAME["cram"]],
                          "--shard-local").states(entry)
    assert differences(r0["params"], r1["params"]) == []
    one = one_process_parameters(entry, tmp_path / "one", 2)
    assert worst_difference(r0["params"], one) > 100 * TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
def test_cram_under_zero2_with_and_without_reduce_scatter_equals_one_process_in_two_all_reduces_a_step(
        tmp_path, launches):
    """CrAM's pass 2 under ZeRO-1/2 (lightning_ext/optimizers/cram_deepspeed.py) takes two all-reduces per step
    whatever the number of tensors (the gathered pass-1 gradient, the averaged pass-2 gradient), and equals one
    process also when ZeRO-2 reduces pass 1 by all-reduce instead of reduce-scatter."""
    import json

    entry = BY_NAME["cram"]
    launch = launches.get("deepspeed_cpu_stage_2_noscatter", "straight", [entry])
    assert sharded_difference(entry, launch, tmp_path) < TOLERANCE
    counted = launches.get("deepspeed_cpu_stage_2", "straight", [entry], "--count-collectives")
    counted.states(entry)  # it ran
    counts = [json.loads((counted.out / entry.name / f"collectives{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1] and len(counts[0]) == 2 * entry.steps, len(counts[0])


@pytest.mark.slow
@pytest.mark.distributed
def test_cram_nm_under_zero3_equals_one_process(tmp_path, launches):
    """N:M compression under ZeRO-3, where flat partition boundaries cut groups of M: the gathered partitions give
    the unsharded masks, and the run equals one process."""
    entry = BY_NAME["cram_nm"]
    assert sharded_difference(entry, launches.get("deepspeed_cpu_stage_3", "straight", [entry]), tmp_path) < TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
def test_cram_under_zero3_refuses_a_prunable_parameter_kept_whole(launches):
    """With DeepSpeed's default persistence threshold the small test model's matrices stay whole on every rank
    outside the partitions; CrAM's pieces would then not cover them once, so it refuses at its first step, naming
    the setting to change."""
    entry = BY_NAME["cram"]
    message = refusal_of(launches.get("deepspeed_cpu_stage_3_persist", "straight", [entry]), entry,
                         r"CrAM under DeepSpeed ZeRO-3 needs every prunable parameter partitioned")
    assert "param_persistence_threshold=0" in message


@pytest.mark.slow
@pytest.mark.distributed
def test_manifest_is_read_from_a_deepspeed_checkpoint_directory(tmp_path):
    from lightning_ext.manifest import read_manifest

    script = os.path.join(os.path.dirname(__file__), "scripts", "deepspeed_manifest.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ckpt").is_dir()
    assert read_manifest(tmp_path / "ckpt") == [
        {"name": "Gate", "state_key": "Gate", "class_path": "toy_techniques.Gate",
         "init_args": {"target_modules": ["net.0"], "init": 0.5}}]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shard_layout_read_from_deepspeed_matches_its_fp32_partitions(tmp_path, stage):
    """ShardLayout.from_deepspeed (ZeRO-1/2) and .from_deepspeed_zero3 on each rank of a live ZeRO run cut the
    module's weights into exactly the flat fp32 partition DeepSpeed holds, and the two ranks together hold every
    element once."""
    import json

    script = os.path.join(os.path.dirname(__file__), "scripts", "deepspeed_layout.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path), str(stage)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for group in range(len(ranks[0])):
        assert all(rank[group]["equal"] for rank in ranks)
        shapes = ranks[0][group]["shapes"]
        total = sum(math.prod(s) for s in shapes)
        assert sum(rank[group]["held"] for rank in ranks) == total
        assert all(0 < rank[group]["held"] < total for rank in ranks)  # both ranks hold part of the model


SHARDED = [(name, stage, ()) for name in ("AdamP", "SGDP", "FAdam", "LAWN") for stage in (1, 2)]
SHARDED += [(name, 3, ()) for name in ("AdamP", "SGDP", "FAdam", "LAWN")]
SHARDED += [(name, 2, ("noscatter",)) for name in ("AdamP", "SGDP", "FAdam", "LAWN")]  # gradients by all-reduce


def _sharded_run(tmp_path, stage: int, name: str, *extra: str, collectives: bool = False):
    """The worst |sharded - full| per step (and with ``collectives``, also the statistic all-reduces per step)."""
    import json

    tmp_path.mkdir(parents=True, exist_ok=True)
    script = os.path.join(os.path.dirname(__file__), "scripts", "deepspeed_sharded_optimizer.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path), str(stage), name, *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1] and len(ranks[0]["worst"]) == 6
    return (ranks[0]["worst"], ranks[0]["collectives"]) if collectives else ranks[0]["worst"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name, stage, extra", SHARDED, ids=[f"{n}-zero{s}{''.join('-' + e for e in x)}"
                                                              for n, s, x in SHARDED])
def test_per_tensor_optimizers_under_zero_equal_the_unsharded_step(tmp_path, name, stage, extra):
    """Under a live 2-process ZeRO-1/2/3 run, every step of the sharded optimizer (LAWN: around SGD, per-row
    sphere with gradient projection, on a hidden weight and the head) equals the same optimizer on the
    gathered full weights and gradients, within 1e-5 over 6 steps (fp32; torch AdamW in the same harness: below
    1e-6, the test below). Measured on CPU: 3e-8 to 5e-8."""
    assert max(_sharded_run(tmp_path, stage, name, *extra)) < 1e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_the_harness_floor_and_the_shard_local_negative_control(tmp_path):
    floor = max(_sharded_run(tmp_path / "adamw", 2, "AdamW"))
    assert floor < 1e-6
    # statistics without the all-reduce: visibly another algorithm (LAWN: only the rows a boundary splits)
    for name, visible in (("AdamP", 1e-3), ("FAdam", 1e-3), ("LAWN", 1e-4)):
        assert max(_sharded_run(tmp_path / f"{name}-naive", 2, name, "naive")) > visible


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["AdamP", "FAdam", "LAWN"])
def test_collectives_per_step_do_not_grow_with_the_number_of_parameters(tmp_path, name):
    """The statistics of a step travel in a fixed number of all-reduces (one per statistic round and param
    group), whatever the number of tensors: a model with twice the layers makes exactly as many per step.
    (LAWN: none in its free steps, then one per round.)"""
    _, shallow = _sharded_run(tmp_path / "shallow", 2, name, collectives=True)
    _, deep = _sharded_run(tmp_path / "deep", 2, name, "deep", collectives=True)
    assert deep == shallow and max(shallow) <= 2, (shallow, deep)
    assert max(shallow) >= 1  # the statistics are reduced at all (the negative control above shows they must be)


def test_param_persistence_threshold_reaches_the_config_and_is_checked():
    from lightning_ext.strategies import DeepSpeedCPUStrategy

    strategy = DeepSpeedCPUStrategy(stage=3, param_persistence_threshold=0)
    assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert "stage3_param_persistence_threshold" not in DeepSpeedCPUStrategy(stage=3).config["zero_optimization"]
    with pytest.raises(ValueError, match="^param_persistence_threshold must be"):
        DeepSpeedCPUStrategy(stage=3, param_persistence_threshold=-1)
