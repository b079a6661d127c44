#!/bin/bash
# Run any lightning_ext config on several nodes with torchrun (no scheduler).
# On every node:
#   NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0 address> MASTER_PORT=29500 NPROC=4 \
#     examples/cluster/torchrun.sh configs/quickstart.yaml [extra lightning-ext args]
# Lightning detects torchrun's environment (TorchElastic) and takes ranks from it.
# On CPU machines add --trainer.accelerator=cpu (gloo); tests/test_multinode.py runs 2 "nodes"
# x 1 process on loopback this way without torchrun (NODE_RANK/MASTER_ADDR/MASTER_PORT only).
set -euo pipefail
CONFIG=${1:?usage: torchrun.sh CONFIG [extra lightning-ext args]}
shift || true

torchrun --nnodes="${NNODES:-2}" --nproc_per_node="${NPROC:-1}" --node_rank="${NODE_RANK:?set NODE_RANK}" \
    --master_addr="${MASTER_ADDR:?set MASTER_ADDR}" --master_port="${MASTER_PORT:-29500}" \
    -m lightning_ext fit --config "$CONFIG" \
    --trainer.num_nodes="${NNODES:-2}" --trainer.devices="${NPROC:-1}" --trainer.strategy=ddp \
    "$@"
