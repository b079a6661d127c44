"""The sharded optimizers (AdamP, SGDP, FAdam, LAWN, CrAM) under gradient accumulation and bf16-mixed, on 2
processes of every sharded strategy: ZeRO-1, ZeRO-2 with reduce-scatter on and off, ZeRO-3 and FSDP2.

**Accumulation.** With ``accumulate_grad_batches=2`` (whole steps only: ``harness.accumulation_settings``) the
full parameters after 16 steps equal a one-process run accumulating the same global micro-batches, within
``test_ranks.TOLERANCE`` (fp32; torch AdamW in the same launch is the floor, ~1e-7; measured 3e-8 to 1.2e-7 for
all 25 cells). Lightning's own DeepSpeed strategy divides every micro-batch's loss twice — its closure by
``accumulate_grad_batches``, the engine's backward by ``gradient_accumulation_steps`` — so a step's gradient is
half the mean: ``deepspeed_cpu`` calls the engine's backward with ``scale_wrt_gas=False``. The negative control
puts Lightning's behaviour back (``--engine-scales-loss``) and the SGD-based entries part from one process by
3e-2 to 3e-1.

**bf16-mixed** (CrAM, 6 steps): the sharded run is compared with one process in bf16-mixed. No fp32 floor
applies: DeepSpeed's bf16 keeps bf16 weights and gradients, autocast keeps fp32 ones, and CrAM's top-k masks
flip on rounding differences. The floor is the same model and SGD without CrAM (registry ``sgd``) in the same
comparison; CrAM stays within ``BF16_FACTOR`` of it (measured ~9x on ZeRO-2 and FSDP2), and CrAM with a
shard-local top-k (what a naive sharded pruner does) does not (21x and 68x).
"""

from __future__ import annotations

import dataclasses

import pytest

from harness import accumulation_settings, sharded_difference
from registry import BY_NAME
from test_ranks import TOLERANCE

pytest.importorskip("deepspeed")

OPTIMIZERS = ["baseline_adamw", "adamp", "sgdp", "fadam", "lawn", "cram"]
STRATEGIES = ["deepspeed_cpu_stage_1", "deepspeed_cpu_stage_2", "deepspeed_cpu_stage_2_noscatter",
              "deepspeed_cpu_stage_3", "fsdp_cpu"]
ACCUMULATE = ("--accumulate", "2", "--steps", "16")
BF16 = ("--precision", "bf16-mixed", "--steps", "6")
BF16_FACTOR = 12.0


def _entries(names: list[str], steps: int) -> list:
    return [dataclasses.replace(BY_NAME[n], steps=steps) for n in names]


CELLS = [(s, n) for s in STRATEGIES for n in OPTIMIZERS]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy, name", CELLS, ids=[f"{n}-{s.removeprefix('deepspeed_cpu_')}" for s, n in CELLS])
def test_accumulated_sharded_run_equals_one_process(tmp_path, launches, strategy, name):
    entries = _entries(OPTIMIZERS, 16)
    entry = entries[OPTIMIZERS.index(name)]
    launch = launches.get(strategy, "straight", entries, *ACCUMULATE)
    worst = sharded_difference(entry, launch, tmp_path, **accumulation_settings(entry, 2, 2))
    assert worst < TOLERANCE, f"max |{strategy}, accumulating 2 - one process| {worst:.3e}"


@pytest.mark.slow
@pytest.mark.distributed
def test_a_second_division_by_the_accumulation_steps_fails_the_comparison(tmp_path, launches):
    entries = _entries(["sgdp", "cram"], 16)
    launch = launches.get("deepspeed_cpu_stage_2", "straight", entries, *ACCUMULATE, "--engine-scales-loss")
    for entry in entries:
        worst = sharded_difference(entry, launch, tmp_path / entry.name, **accumulation_settings(entry, 2, 2))
        assert worst > 1e-3, f"{entry.name}: the doubly divided gradient went unnoticed ({worst:.3e})"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["deepspeed_cpu_stage_2", "fsdp_cpu"])
def test_cram_in_bf16_mixed_is_as_close_to_one_process_as_its_optimizer_alone(tmp_path, launches, strategy):
    entries = _entries(["sgd", "cram"], 6)
    sgd, cram = (sharded_difference(e, launches.get(strategy, "straight", entries, *BF16), tmp_path / e.name,
                                    precision="bf16-mixed") for e in entries)
    assert cram < BF16_FACTOR * sgd, f"CrAM {cram:.3e} vs SGD alone {sgd:.3e} in bf16-mixed under {strategy}"
    naive = sharded_difference(entries[1], launches.get(strategy, "straight", entries[1:], *BF16, "--shard-local"),
                               tmp_path / "naive", precision="bf16-mixed")
    assert naive > BF16_FACTOR * sgd, f"a shard-local CrAM passed: {naive:.3e} vs SGD alone {sgd:.3e}"
