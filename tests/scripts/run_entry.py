"""Train a registry entry in its own processes (for strategies whose launcher re-runs the script).

    python tests/scripts/run_entry.py ENTRY OUT --strategy deepspeed_cpu_stage_2 --devices 2
    python tests/scripts/run_entry.py ENTRY OUT --strategy fsdp_cpu --devices 2

Each rank writes ``OUT/rank<r>.pt`` (see ``harness.DumpRankState``); a refusal at setup is
written to ``OUT/error.txt``. Exits through ``os._exit`` after tearing down the process group:
gloo in torch 2.13 otherwise aborts at interpreter exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_exit import exit_now, write_error  # noqa: E402  (the scripts folder is on sys.path)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("entry")
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--shard-local", action="store_true",
                        help="negative control: the sharded optimizers' statistics without their all-reduce")
    parser.add_argument("--count-collectives", action="store_true",
                        help="write OUT/collectives<rank>.json: the statistic all-reduces of the whole run")
    args = parser.parse_args()
    from lightning_ext.optimizers import _sharding

    calls = []
    if args.shard_local:
        _sharding.all_reduce = lambda tensor, group: None
    elif args.count_collectives:
        reduce = _sharding.all_reduce
        _sharding.all_reduce = lambda tensor, group: (calls.append(tensor.numel()), reduce(tensor, group))

    logging.getLogger("lightning").setLevel(logging.WARNING)
    import lightning_ext.strategies  # noqa: F401  (registers deepspeed_cpu*)
    from harness import DumpRankState, fit
    from registry import BY_NAME

    entry = BY_NAME[args.entry]
    strategy = args.strategy
    if strategy.startswith("deepspeed_cpu_stage_"):  # every parameter partitioned under ZeRO-3, however small
        from lightning_ext.strategies import DeepSpeedCPUStrategy

        strategy = DeepSpeedCPUStrategy(stage=int(strategy.rsplit("_", 1)[1]), param_persistence_threshold=0)
    try:
        fit(entry, args.out, entry.steps, callbacks=[DumpRankState(args.out)], strategy=strategy,
            devices=args.devices, val_check_interval=None, limit_val_batches=0)
    except Exception as err:  # noqa: BLE001 - the test reads the refusal message
        return write_error(args.out, err)
    if args.count_collectives:
        import json
        import os

        (args.out / f"collectives{os.environ.get('LOCAL_RANK', '0')}.json").write_text(json.dumps(calls))
    return 0


if __name__ == "__main__":
    exit_now(main())
