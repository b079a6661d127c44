"""Train several registry entries, one after another, in one launch of 2 processes (DeepSpeed, FSDP2).

    python tests/scripts/run_entries.py OUT --strategy fsdp_cpu --mode straight [--entries adamp,lawn]

One launch per strategy and mode instead of one per entry: the launcher starts the processes and the process
group once, and each entry's ``fit`` reuses them (Lightning does not relaunch once ``LOCAL_RANK`` is set). Each
entry writes under ``OUT/<entry>/``:

* ``--mode straight``: ``entry.steps`` steps; every rank's end state in ``straight/rank<r>.pt``;
* ``--mode stop``: ``entry.resume_at`` steps with a checkpoint there (``ckpt/stop.ckpt``). The launch is killed
  with SIGKILL right after the last entry's checkpoint is written (every rank, after a barrier: the checkpoint
  is complete when the save returns, nothing after it — the rest of the step, teardown — contributes);
* ``--mode resume``: from ``ckpt/stop.ckpt`` to ``entry.steps``; end state in ``resumed/rank<r>.pt``;
* ``--mode nonfinite``: the NaN-sample experiment (``harness.nonfinite_run``, one NaN sample on rank 0 at step
  ``--nan-at``): the guarded run's end state in ``straight/``, the run without that batch in ``reference/``.

A refusal at setup is written to ``OUT/<entry>/<mode>-errors/error<r>.txt`` and the next entry runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from script_exit import exit_now, write_error  # noqa: E402  (the scripts folder is on sys.path)


def _strategy(name: str):
    if name.startswith("deepspeed_cpu_stage_"):  # every parameter partitioned under ZeRO-3, however small
        from lightning_ext.strategies import DeepSpeedCPUStrategy

        stage, _, variant = name.removeprefix("deepspeed_cpu_stage_").partition("_")
        # "_noscatter": ZeRO-2 reducing the gradients by all-reduce instead of reduce-scatter; "_persist": ZeRO-3
        # with DeepSpeed's default persistence threshold (small parameters kept whole on every rank)
        return DeepSpeedCPUStrategy(stage=int(stage), param_persistence_threshold=None if variant == "persist" else 0,
                                    reduce_scatter=variant != "noscatter")
    return name


def _killing_checkpoint(dirpath: Path, every: int, kill: bool):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    class KillAfterCheckpoint(ModelCheckpoint):
        """Saves like ModelCheckpoint; with ``kill``, every rank SIGKILLs itself right after the save."""

        def on_train_batch_end(self, trainer: pl.Trainer, *args, **kwargs) -> None:
            super().on_train_batch_end(trainer, *args, **kwargs)
            if kill and trainer.global_step == every:
                trainer.strategy.barrier()  # every rank has returned from the (collective) save
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAfterCheckpoint(dirpath=dirpath, filename="stop", every_n_train_steps=every, save_top_k=-1)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--mode", choices=["straight", "stop", "resume", "nonfinite"], default="straight")
    parser.add_argument("--entries", default="", help="comma-separated names (default: every registry entry)")
    parser.add_argument("--shard-local", action="store_true",
                        help="negative control: the sharded optimizers' statistics without their all-reduce")
    parser.add_argument("--count-collectives", action="store_true",
                        help="write OUT/<entry>/collectives<rank>.json: the statistic all-reduces of the run")
    parser.add_argument("--engine-scales-loss", action="store_true",
                        help="negative control: DeepSpeed's backward divides by accumulate_grad_batches a second "
                             "time, as under Lightning's own DeepSpeed strategy")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="accumulate_grad_batches, over whole steps only (harness.accumulation_settings)")
    parser.add_argument("--steps", type=int, default=0, help="train this many steps instead of entry.steps")
    parser.add_argument("--nan-at", type=int, default=9, help="--mode nonfinite: the step with the NaN sample")
    parser.add_argument("--poison", choices=["sample", "gradient"], default="sample",
                        help="--mode nonfinite: a NaN sample (harness.PoisonStep) or one infinite gradient element "
                             "on rank 0 only (harness.InfGradient)")
    parser.add_argument("--local-verdict", action="store_true",
                        help="negative control: NonFiniteGuard decides on each rank's own flags (no all-reduce)")
    args = parser.parse_args()
    from lightning_ext.optimizers import _sharding

    calls: list[int] = []
    if args.shard_local:
        _sharding.all_reduce = lambda tensor, group: None
        from lightning_ext.nn.pruning import topk_masks
        from lightning_ext.optimizers.cram import CrAM, _local

        # CrAM: a per-shard top-k (what a naive sharded pruner does) instead of the exact selection over ranks
        CrAM.masks = lambda self, level: topk_masks([_local(p) for p in self.prunable], level, self.scope)
    elif args.count_collectives:
        reduce = _sharding.all_reduce
        _sharding.all_reduce = lambda tensor, group: (calls.append(tensor.numel()), reduce(tensor, group))

    if args.local_verdict:
        from lightning_ext.callbacks.nonfinite import NonFiniteGuard

        NonFiniteGuard._all_ranks = lambda self, loss, grads: (bool(loss), bool(grads))  # noqa: SLF001

    if args.engine_scales_loss:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from lightning_ext.strategies import DeepSpeedCPUStrategy

        DeepSpeedCPUStrategy.backward, DeepSpeedCPUStrategy.engine_scales_loss = DeepSpeedStrategy.backward, True

    logging.getLogger("lightning").setLevel(logging.WARNING)
    import lightning_ext.strategies  # noqa: F401  (registers deepspeed_cpu*, fsdp_cpu)
    from harness import DumpRankState, InfGradient, accumulation_settings, fit, nonfinite_run
    from composition import BY_NAME as COMPOSED
    from registry import BY_NAME, REGISTRY

    BY_NAME = {**BY_NAME, **COMPOSED}  # noqa: N806 - the registry's and the composition pairs' entries

    entries = [BY_NAME[n] for n in args.entries.split(",")] if args.entries else REGISTRY
    if args.steps:
        entries = [dataclasses.replace(e, steps=args.steps) for e in entries]
    rank = os.environ.get("LOCAL_RANK", "0")
    for i, entry in enumerate(entries):
        quiet = dict(val_check_interval=None, limit_val_batches=0, devices=2, precision=args.precision,
                     **accumulation_settings(entry, 2, args.accumulate))
        out = args.out / entry.name
        calls.clear()
        try:
            if args.mode == "straight":
                fit(entry, out, entry.steps, callbacks=[DumpRankState(out / "straight")],
                    strategy=_strategy(args.strategy), **quiet)
            elif args.mode == "nonfinite":
                poison = [InfGradient(args.nan_at)] if args.poison == "gradient" else []
                for side, folder in ((False, "straight"), (True, "reference")):
                    nonfinite_run(entry, out, entry.steps, args.nan_at, side,
                                  [DumpRankState(out / folder), *([] if side else poison)],
                                  strategy=_strategy(args.strategy), **quiet)
            elif args.mode == "stop":
                last = i == len(entries) - 1
                saver = _killing_checkpoint(out / "ckpt", entry.resume_at, kill=last)
                fit(entry, out, entry.steps if last else entry.resume_at, callbacks=[saver],
                    enable_checkpointing=True, strategy=_strategy(args.strategy), **quiet)
            else:
                fit(entry, out, entry.steps, ckpt_path=str(out / "ckpt" / "stop.ckpt"),
                    callbacks=[DumpRankState(out / "resumed")], strategy=_strategy(args.strategy), **quiet)
        except Exception as err:  # noqa: BLE001 - the test reads the refusal message
            write_error(out / f"{args.mode}-errors", err)
            continue
        if args.count_collectives:
            (out / f"collectives{rank}.json").write_text(json.dumps(calls))
    return 0


if __name__ == "__main__":
    exit_now(main())
