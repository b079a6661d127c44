"""FSDP2 on CPU (``fsdp_cpu``: ``fully_shard``, 2 processes, gloo): each technique trains and computes what one
process computes on the global batch (the full weights, gathered from the dim-0 shards, within
``test_ranks.TOLERANCE``; QuEST against the fp32 DDP run, as under DeepSpeed), or is refused at setup naming
FSDP — never a silent wrong result.

Before this test existed, LAWN and CrAM trained under FSDP2 with agreeing ranks and were 0.22 and 0.41 away from
one process (they held the parameters of the unsharded module, which ``fully_shard`` replaces); that is the
failure these cells catch. The optimizers' own negative control is below.
"""

from __future__ import annotations

import json

import pytest

from harness import differences, one_process_parameters, resume_difference, sharded_difference, worst_difference
from harness import refusal_of
from registry import BY_NAME, REGISTRY
from test_ranks import TOLERANCE

TRAINED = [e for e in REGISTRY if e.fsdp == "train"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry", REGISTRY, ids=lambda e: e.name)
def test_fsdp_cpu(entry, tmp_path, launches):
    launch = launches.get("fsdp_cpu")
    if entry.fsdp == "train":
        worst = sharded_difference(entry, launch, tmp_path)
        assert worst < TOLERANCE, f"max |FSDP2 - {entry.sharded_reference}| {worst:.3e}"
    else:
        assert "FSDP" in refusal_of(launch, entry, entry.fsdp)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("entry", TRAINED, ids=lambda e: e.name)
def test_fsdp_resume_after_sigkill_is_exact(entry, launches):
    """Killed with SIGKILL right after the step-``resume_at`` checkpoint (a distributed checkpoint: one shard per
    rank), resumed on 2 processes: each rank ends bit-identical to the run that never stopped — weights, its
    shard of the optimizer state, technique state, global step and data position."""
    assert resume_difference(entry, launches, "fsdp_cpu", TRAINED) == []


@pytest.mark.slow
@pytest.mark.distributed
def test_cram_nm_under_fsdp_equals_one_process(tmp_path, launches):
    """N:M compression on FSDP2's dim-0 shards (rows whole, groups local) equals one process."""
    entry = BY_NAME["cram_nm"]
    assert sharded_difference(entry, launches.get("fsdp_cpu", "straight", [entry]), tmp_path) < TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name", ["adamp", "cram"])
def test_a_shard_local_optimizer_fails_under_fsdp(tmp_path, launches, name):
    """Negative controls: AdamP with its per-row statistics summed over each rank's own rows only (the all-reduce
    removed; measured 1.1e-2 from one process), and CrAM with a top-k per shard instead of over all ranks, train
    with agreeing ranks — and miss one process by far more than TOLERANCE."""
    entries = [BY_NAME["adamp"], BY_NAME["cram"]]
    entry = BY_NAME[name]
    r0, r1 = launches.get("fsdp_cpu", "straight", entries, "--shard-local").states(entry)
    assert differences(r0["params"], r1["params"]) == []
    assert worst_difference(r0["params"], one_process_parameters(entry, tmp_path / "one", 2)) > 100 * TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("name, rounds", [("adamp", 1), ("fadam", 2), ("cram", 4)])
def test_statistics_travel_in_one_all_reduce_per_round(launches, name, rounds):
    """Under FSDP2 the per-tensor optimizers reduce the statistics of all their tensors (here 6: three Linear
    weights and biases, and a LayerNorm's two) in one all-reduce per statistic round and step — not one per
    tensor, and not DTensor's implicit collectives per operation. CrAM's global top-k over both weight matrices
    takes one histogram all-reduce per byte of fp32 (4 rounds of its radix select) per step."""
    entries = [BY_NAME["adamp"], BY_NAME["fadam"], BY_NAME["cram"]]
    launch = launches.get("fsdp_cpu", "straight", entries, "--count-collectives")
    entry = BY_NAME[name]
    launch.states(entry)  # it ran
    counts = [json.loads((launch.out / name / f"collectives{r}.json").read_text()) for r in range(2)]
    assert counts[0] == counts[1]
    assert len(counts[0]) == rounds * entry.steps, len(counts[0])


def test_shard_refuses_a_module_class_that_does_not_exist():
    from lightning_ext.models import MLPClassifier
    from lightning_ext.strategies.fsdp_cpu import shard

    with pytest.raises(ValueError, match=r"shard_modules: no submodule of class \['Lineer'\].*'Linear'"):
        shard(MLPClassifier(hidden=[8]), mesh=None, shard_modules=["Lineer"])


def test_strategy_arguments_are_checked_and_it_reports_fsdp():
    from lightning_ext.strategies import FSDPCPUStrategy, strategy_info

    with pytest.raises(ValueError, match="^shard_modules must be a list"):
        FSDPCPUStrategy(shard_modules="LlamaDecoderLayer")
    with pytest.raises(ValueError, match="^reshard_after_forward must be True or False"):
        FSDPCPUStrategy(reshard_after_forward=1)
    info = strategy_info(FSDPCPUStrategy())
    assert info.is_fsdp and info.shards_parameters and str(info) == "FSDP"
