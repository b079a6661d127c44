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


@pytest.mark.slow
@pytest.mark.distributed
def test_quickstart_on_two_nodes(tmp_path):
    port = _free_port()
    args = [sys.executable, "-m", "lightning_ext", "fit", "--config", str(ROOT / "configs" / "quickstart.yaml"),
            "--trainer.num_nodes=2", "--trainer.devices=1", "--trainer.strategy=ddp", "--trainer.max_steps=3",
            "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1", "--trainer.num_sanity_val_steps=0",
            "--data.init_args.train_chars=200000"]
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "NODE_RANK": str(node),
               "HF_HUB_OFFLINE": "1"}
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        procs.append(subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            p.kill()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node}:\n{out[-3000:]}"
        assert f"GLOBAL_RANK: {node}, MEMBER: {node + 1}/2" in out, out[-3000:]
    # rank 0 (node 0) writes the checkpoint; node 1 writes none
    assert list((tmp_path / "node0").rglob("*.ckpt")) and not list((tmp_path / "node1").rglob("*.ckpt"))
