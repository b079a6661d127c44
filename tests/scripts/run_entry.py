"""Train a registry entry in its own processes (for strategies whose launcher re-runs the script).

    python tests/scripts/run_entry.py ENTRY OUT --strategy deepspeed_cpu_stage_2 --devices 2

Each rank writes ``OUT/rank<r>.pt`` (see ``harness.DumpRankState``); a refusal at setup is
written to ``OUT/error.txt``. Exits through ``os._exit`` after tearing down the process group:
gloo in torch 2.13 otherwise aborts at interpreter exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("entry")
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    args = parser.parse_args()

    logging.getLogger("lightning").setLevel(logging.WARNING)
    import lightning_ext.strategies  # noqa: F401  (registers deepspeed_cpu*)
    from harness import DumpRankState, fit
    from registry import BY_NAME

    entry = BY_NAME[args.entry]
    try:
        fit(entry, args.out, entry.steps, callbacks=[DumpRankState(args.out)], strategy=args.strategy,
            devices=args.devices, val_check_interval=None, limit_val_batches=0)
    except Exception as err:  # noqa: BLE001 - the test reads the refusal message
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"error{os.environ.get('LOCAL_RANK', '0')}.txt").write_text(
            f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        return 3
    return 0


if __name__ == "__main__":
    rc = main()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
