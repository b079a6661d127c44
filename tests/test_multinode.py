"""Two "nodes" x 1 process on loopback through the CLI, as examples/cluster/ runs on a real cluster."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cli_utils import ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHORT = ["--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
         "--trainer.num_sanity_val_steps=0", "--data.init_args.train_chars=200000"]


def _communicate(procs: list[subprocess.Popen], timeout: int = 300) -> list[str]:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    return outputs


def _node_env(port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "HF_HUB_OFFLINE": "1", **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    # the scripts call `python` and `torchrun`: this interpreter's
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def _checkpoints(folder) -> list:
    """Checkpoint files below ``folder``: a .ckpt file, or the files inside a .ckpt folder (DeepSpeed, FSDP2)."""
    return [f for f in folder.rglob("*") if f.is_file() and any(part.endswith(".ckpt") for part in f.parts)]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_cpu_stage_2", "fsdp_cpu"])
def test_quickstart_on_two_nodes(tmp_path, strategy):
    """2 nodes x 1 process on loopback through the CLI, with DDP, DeepSpeed ZeRO-2 and FSDP2: ranks on both
    nodes join one process group and train; the checkpoint is rank 0's file under DDP, and under the sharded
    strategies each node writes its rank's part (here into its own working directory; on a cluster, one
    shared folder)."""
    port = _free_port()
    args = [sys.executable, "-m", "lightning_ext", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.num_nodes=2", "--trainer.devices=1", f"--trainer.strategy={strategy}", *SHORT]
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        procs.append(subprocess.Popen(args, cwd=cwd, env=_node_env(port, NODE_RANK=str(node)),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = _communicate(procs)
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in out, out[-3000:]
    assert "`max_steps=3` reached" in outputs[0], outputs[0][-3000:]  # rank 0 reports
    assert _checkpoints(tmp_path / "node0")
    if strategy == "ddp":  # rank 0 (node 0) writes the checkpoint; node 1 writes none
        assert not _checkpoints(tmp_path / "node1")
    else:
        assert _checkpoints(tmp_path / "node1")


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_script_as_written_on_two_loopback_nodes(tmp_path):
    """examples/cluster/torchrun.sh, unchanged, on 2 "nodes" x 1 process: its environment variables, CPU."""
    port = _free_port()
    script = ROOT / "examples" / "cluster" / "torchrun.sh"
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        env = _node_env(port, NNODES="2", NODE_RANK=str(node), NPROC="1")
        procs.append(subprocess.Popen(["bash", str(script), str(ROOT / "configs" / "quickstart.yaml"),
                                       "--trainer.accelerator=cpu", *SHORT], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = _communicate(procs)
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in out, out[-3000:]


FAKE_SRUN = """#!/bin/bash
# srun for a test: start SLURM_NTASKS copies of the command on this machine, with the variables srun sets
pids=()
for ((task = 0; task < SLURM_NTASKS; task++)); do
  SLURM_PROCID=$task SLURM_LOCALID=$((task % SLURM_NTASKS_PER_NODE)) SLURM_NODEID=$((task / SLURM_NTASKS_PER_NODE)) \
    "$@" > "task$task.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
@pytest.mark.distributed
def test_slurm_script_as_written_under_a_stand_in_srun(tmp_path):
    """examples/cluster/slurm.sbatch, unchanged, run by bash (as sbatch would) with the variables SLURM sets for a
    2-node x 1-task allocation and a stand-in ``srun`` that starts the 2 tasks on this machine: Lightning
    detects SLURM, takes ranks from it, and trains (``--trainer.accelerator=cpu`` appended, as a CPU user
    would, overriding the script's gpu)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    env = _node_env(_free_port(), SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_NTASKS="2",
                    SLURM_NTASKS_PER_NODE="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="lightning-ext",
                    SLURM_NODELIST="127.0.0.1")
    env.pop("MASTER_ADDR")
    env["PATH"] = os.pathsep.join([str(bin_dir), env["PATH"]])
    script = ROOT / "examples" / "cluster" / "slurm.sbatch"
    proc = subprocess.run(["bash", str(script), str(ROOT / "configs" / "quickstart.yaml"),
                           "--trainer.accelerator=cpu", *SHORT], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    logs = [(tmp_path / f"task{t}.log").read_text() for t in range(2)]
    assert proc.returncode == 0, proc.stderr[-2000:] + "".join(log[-3000:] for log in logs)
    for task, log in enumerate(logs):
        assert f"GLOBAL_RANK: {task}, MEMBER: {task + 1}/2" in log, log[-3000:]
    assert "`max_steps=3` reached" in logs[0]
