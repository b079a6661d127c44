"""Helpers for the cross-cutting tests: build a trainer for a registry entry, snapshot, compare."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from registry import Entry


def digits_batches(n: int, batch: int = 64, dtype: torch.dtype = torch.float64):
    """``n`` seeded random mini-batches of the digits data (for optimizer-level tests)."""
    from lightning_ext.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        yield x[idx].to(dtype), y[idx]


def technique_callbacks(trainer: pl.Trainer) -> dict[str, Any]:
    """State of every callback that has any (keyed like Lightning's checkpoint)."""
    return {cb.state_key: cb.state_dict() for cb in trainer.callbacks if cb.state_dict()}


def snapshot(trainer: pl.Trainer) -> dict[str, Any]:
    """Everything a resume must restore: weights, optimizer state, callback and datamodule state."""
    module = trainer.lightning_module
    return clone({
        "model": module.state_dict(),
        "optimizers": [opt.state_dict() for opt in trainer.optimizers],
        "callbacks": technique_callbacks(trainer),
        "datamodule": trainer.datamodule.state_dict() if trainer.datamodule is not None else {},
        "global_step": trainer.global_step,
    })


def clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        return {k: clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone(v) for v in obj)
    return obj


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two nested states differ (tensors compared bit for bit, with dtype and shape)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b if isinstance(a, torch.Tensor) else a).__name__}"]
        if a.dtype != b.dtype or a.shape != b.shape:
            return [f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"]
        if not torch.equal(a, b):
            return [f"{path}: max |diff| {(a.double() - b.double()).abs().max().item():.3e}"]
        return []
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = [f"{path}/{k}: missing on one side" for k in set(a) ^ set(b)]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def make_trainer(entry: Entry, root: Path, max_steps: int, callbacks: list[pl.Callback] | None = None,
                 **kwargs: Any) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root),
                    num_sanity_val_steps=0, val_check_interval=10, limit_val_batches=2, deterministic=True)
    defaults.update(kwargs)
    return pl.Trainer(callbacks=[*entry.callbacks(), *(callbacks or [])], **defaults)


def fit(entry: Entry, root: Path, max_steps: int, ckpt_path: str | None = None,
        callbacks: list[pl.Callback] | None = None, batch_scale: int = 1, **kwargs: Any) -> pl.Trainer:
    """Seeded fit of ``entry``; ``batch_scale`` multiplies the datamodule's (per-process) batch size."""
    pl.seed_everything(0, verbose=False)
    model, data = entry.model(), entry.data()
    data.batch_size *= batch_scale
    trainer = make_trainer(entry, root, max_steps, callbacks, **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer


def accumulation_settings(entry: Entry, world_size: int, accumulate: int) -> dict[str, Any]:
    """Trainer arguments that accumulate ``accumulate`` micro-batches per step over whole steps only: each
    epoch is cut to a multiple of ``accumulate`` micro-batches (Lightning otherwise steps on the micro-batches
    left at an epoch's end). The same count for ``world_size`` processes and for one process on their global
    batch (``batch_scale=world_size``): both read len(dataset) // (world_size x batch) batches per epoch
    (drop_last on both sides). Counted from the dataset, not from a dataloader, whose sampler would see the
    process group of an earlier run in the same process."""
    if accumulate == 1:
        return {}
    data = entry.data()
    data.setup("fit")
    per_epoch = len(data.train_set) // (world_size * data.batch_size)
    return {"accumulate_grad_batches": accumulate, "limit_train_batches": per_epoch - per_epoch % accumulate}


def resume_differences(entry: Entry, root: Path) -> list[str]:
    """Train ``entry.steps`` straight through; separately stop at ``entry.resume_at`` (checkpoint),
    resume in fresh objects and finish. Returns where the two end states differ."""
    straight = snapshot(fit(entry, root / "straight", entry.steps))
    # saved from inside the training loop, as a preempted run's last checkpoint would be
    saver = ModelCheckpoint(dirpath=root / "stopped", filename="stop", every_n_train_steps=entry.resume_at,
                            save_top_k=-1)
    fit(entry, root / "stopped", entry.resume_at, callbacks=[saver], enable_checkpointing=True)
    ckpt = root / "stopped" / "stop.ckpt"
    resumed = snapshot(fit(entry, root / "resumed", entry.steps, ckpt_path=str(ckpt)))
    return differences(straight, resumed)


class DumpRankState(pl.Callback):
    """At the end of training, every rank writes its weights, technique state, optimizer state (its own shard of
it under ZeRO and FSDP), global step and data position to ``out/rank<r>.pt``.

    Under DeepSpeed the weights are gathered to full fp32 tensors first (a collective: every
    rank takes part), so ranks can be compared whatever the ZeRO stage; a frozen ZeRO-3 parameter (no fp32
    master copy) is gathered from its partitions.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = {}
        for name, p in pl_module.named_parameters():
            if hasattr(p, "ds_id") or type(trainer.strategy).__name__.startswith("DeepSpeed"):
                from deepspeed.utils import safe_get_full_fp32_param

                full = safe_get_full_fp32_param(p)
                if full is None and hasattr(p, "ds_id"):  # frozen under ZeRO-3: not in the optimizer
                    from deepspeed.runtime.zero import GatheredParameters

                    with GatheredParameters([p]):
                        full = p.detach().clone()
                params[name] = (full if full is not None else p).detach().clone()
            elif hasattr(p, "full_tensor"):  # FSDP2: a DTensor sharded on dim 0
                params[name] = p.detach().full_tensor().clone()
            else:
                params[name] = p.detach().clone()
        state = {"params": params, "callbacks": clone(technique_callbacks(trainer)),
                 "global_step": trainer.global_step, "world_size": trainer.world_size,
                 "optimizer": _optimizer_state(trainer),
                 "datamodule": trainer.datamodule.state_dict() if trainer.datamodule is not None else {}}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
        # this rank's last training loss (its own micro-batch: not part of what the ranks must agree on)
        torch.save(_last_loss(trainer), self.out / f"loss{trainer.global_rank}.pt")


def _last_loss(trainer: pl.Trainer) -> float | None:
    """The last logged training loss (``train/loss`` or ``train_loss``), if the module logs one."""
    for key in ("train/loss", "train_loss", "loss"):
        if key in trainer.callback_metrics:
            return float(trainer.callback_metrics[key])
    return None


def _optimizer_state(trainer: pl.Trainer) -> dict[str, Any]:
    """This rank's optimizer state. Under DeepSpeed: the fp32 master partitions, the client optimizer's state of
    each and its param-group settings (its ``state_dict()`` cannot be called there: ZeRO-3 swaps one sub-group
    at a time into its param groups); elsewhere the optimizer's ``state_dict()`` (DTensors as local shards)."""
    optimizer = trainer.optimizers[0]
    if not type(optimizer).__module__.startswith("deepspeed"):
        return _local(optimizer.state_dict())
    from lightning_ext.optimizers.shard_layout import ShardLayout

    client = optimizer.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        flats, held = optimizer.single_partition_of_fp32_groups, [None] * len(optimizer.bit16_groups)
    else:  # ZeRO-3: the padding at the end of each parameter's partition is left uninitialised: not compared
        flats = optimizer.fp32_partitioned_groups_flat
        held = [ShardLayout.from_deepspeed_zero3(optimizer, i).segments for i in range(len(flats))]

    def real(t: Any, segments) -> Any:
        if segments is None or not isinstance(t, torch.Tensor) or t.dim() != 1:
            return clone(t)
        return torch.cat([t[s.start:s.start + s.length] for s in segments]) if segments else t[:0].clone()

    return {"fp32": [real(f, h) for f, h in zip(flats, held)],
            "state": [{k: real(v, h) for k, v in client.state.get(f, {}).items()} for f, h in zip(flats, held)],
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in client.param_groups]}


def _local(obj: Any) -> Any:
    """A copy with every DTensor replaced by its local shard (this rank's part, as the rank holds it)."""
    if hasattr(obj, "to_local"):
        return obj.to_local().detach().clone()
    if isinstance(obj, Mapping):
        return {k: _local(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_local(v) for v in obj)
    return clone(obj)


def ddp_rank_states(entry: Entry, root: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Train ``entry`` on 2 DDP processes (``ddp_fork``, gloo); each rank's end state (``DumpRankState``)."""
    fit(entry, root, entry.steps, callbacks=[DumpRankState(root / "ranks")], strategy="ddp_fork", devices=2,
        **kwargs)
    return rank_states(root / "ranks", 2)


def rank_states(out: Path, world_size: int) -> list[dict[str, Any]]:
    files = sorted(Path(out).glob("rank*.pt"))
    assert len(files) == world_size, f"expected {world_size} rank files in {out}, found {[f.name for f in files]}"
    return [torch.load(f, weights_only=False) for f in files]


def one_process_parameters(entry: Entry, root: Path, world_size: int, **kwargs: Any) -> dict[str, torch.Tensor]:
    """Full parameters after a one-process run of ``entry`` on the **global** batch of a ``world_size``-process
    run (``world_size`` × the per-process batch), in the same data order: the suite's sampler is a
    ``DistributedSampler`` over one seeded permutation (rank r reads every ``world_size``-th index of it), so
    global batch k of the ranks holds exactly one process's batch k. Lightning's own distributed sampler is
    never put in (``ResumableDataModule`` brings its own), so nothing reshuffles on either side."""
    trainer = fit(entry, root, entry.steps, batch_scale=world_size, **kwargs)
    return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()}


def worst_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over the parameters both hold (same names and shapes required)."""
    assert set(a) == set(b), f"parameter names differ: {sorted(set(a) ^ set(b))[:6]}"
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def initial_parameters(entry: Entry, root: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    """The parameters a run of ``entry`` starts training from, named as during training: after the
    technique's setup (an adapter renames and adds parameters), before any step (``max_steps=0``)."""
    trainer = fit(entry, root, 0, **kwargs)
    return {n: p.detach().clone() for n, p in trainer.lightning_module.named_parameters()}


SCRIPT = Path(__file__).parent / "scripts" / "run_entries.py"


@dataclass
class Launch:
    """One launch of ``scripts/run_entries.py``: 2 processes of one strategy training several entries."""

    out: Path
    mode: str
    returncode: int
    log: str

    def errors(self, entry: Entry) -> list[str]:
        folder = self.out / entry.name / f"{self.mode}-errors"
        return [e.read_text() for e in sorted(folder.glob("error*.txt"))] if folder.exists() else []

    def states(self, entry: Entry) -> list[dict[str, Any]]:
        """Each rank's end state of ``entry`` (straight or resumed), after checking that it ran."""
        errors = self.errors(entry)
        folder = self.out / entry.name / ("resumed" if self.mode == "resume" else "straight")
        assert not errors and folder.exists(), f"{entry.name}: rc={self.returncode}\n" + "".join(errors) + \
            self.log[-3000:]
        return rank_states(folder, 2)


class Launches:
    """Runs each (strategy, mode, entries, extra) launch once per test session and hands out the result: one
    launch trains every entry (the process start, imports and process group paid once, not per entry).
    ``stop`` and ``resume`` of a strategy share their folder (the resume reads the stop's checkpoints)."""

    def __init__(self, root: Path) -> None:
        self.root, self.done = Path(root), {}

    def get(self, strategy: str, mode: str = "straight", entries: Sequence[Entry] | None = None,
            *extra: str) -> Launch:
        import hashlib
        import subprocess
        import sys

        names = ",".join(e.name for e in entries) if entries is not None else ""
        key = (strategy, mode, names, extra)
        if key not in self.done:
            # one folder per (strategy, extra, entries): a resume finds the checkpoints its stop wrote there
            folder = names if len(names) <= 120 else f"{len(entries)}-entries-{hashlib.sha1(names.encode()).hexdigest()[:12]}"
            out = self.root / "-".join([strategy, *(x.strip("-") for x in extra)]) / (folder or "all")
            out.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--strategy", strategy, "--mode", mode,
                                   *(["--entries", names] if names else []), *extra], cwd=out, capture_output=True,
                                  text=True, timeout=1500)
            self.done[key] = Launch(out, mode, proc.returncode, proc.stdout[-3000:] + proc.stderr[-6000:])
        return self.done[key]


def sharded_difference(entry: Entry, launch: Launch, root: Path, **kwargs: Any) -> float:
    """Check ``entry`` in a 2-process sharded launch: it ended cleanly, the ranks agree bit for bit, the weights
    are finite and moved; returns max |its full weights - the reference| (``entry.sharded_reference``: one
    process on the global batch, or 2 DDP processes; ``kwargs`` go to the reference's Trainer, as the launch's
    own settings went to its runs)."""
    r0, r1 = launch.states(entry)
    assert r0["world_size"] == 2 and r0["global_step"] == entry.steps
    assert differences(r0["params"], r1["params"]) == [] and differences(r0["callbacks"], r1["callbacks"]) == []
    assert all(torch.isfinite(p).all() for p in r0["params"].values())
    initial = _cached(("initial", entry.name), lambda: initial_parameters(entry, root / "initial"))
    common = [n for n in initial if n in r0["params"]]
    assert common and any(not torch.equal(r0["params"][n], initial[n]) for n in common), "nothing trained"
    key = (entry.sharded_reference, entry.name, entry.steps, repr(sorted(kwargs.items())))
    if entry.sharded_reference == "ddp":  # 2 DDP processes, equal to one process in float64 (test_ranks)
        reference = _cached(key, lambda: ddp_rank_states(entry, root / "ddp", **kwargs)[0]["params"])
    else:  # one process, unsharded, on the global batch
        reference = _cached(key, lambda: one_process_parameters(entry, root / "one", 2, **kwargs))
    return worst_difference(r0["params"], reference)


#: the references of sharded_difference, computed once per test session: every strategy's cell of an entry
#: compares with the same one-process (or DDP) run of the same settings
_REFERENCES: dict[tuple, dict[str, torch.Tensor]] = {}


def _cached(key: tuple, compute) -> dict[str, torch.Tensor]:
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def refusal_of(launch: Launch, entry: Entry, expected: str) -> str:
    """The first line of the refusal ``entry`` met in a sharded launch (asserted to match ``expected``)."""
    import re

    errors = launch.errors(entry)
    assert errors, f"{entry.name}: expected a refusal matching {expected!r}; launch rc={launch.returncode}"
    message = errors[0].splitlines()[0]
    assert re.search(expected, message), message
    return message


def resume_difference(entry: Entry, launches: Launches, strategy: str, trained: Sequence[Entry]) -> list[str]:
    """Where ``entry``'s end state after a SIGKILL right after the step-``resume_at`` checkpoint and a resume
    differs from the uninterrupted run, rank by rank (weights, this rank's optimizer state, technique state,
    global step, data position). ``trained``: the entries the strategy's stop/resume launches run."""
    straight = launches.get(strategy).states(entry)
    stop = launches.get(strategy, "stop", trained)
    assert stop.returncode == -9, f"the stop launch was to end by SIGKILL, rc={stop.returncode}\n{stop.log}"
    resumed = launches.get(strategy, "resume", trained).states(entry)
    return [f"rank {r}: {d}" for r, (a, b) in enumerate(zip(straight, resumed)) for d in differences(a, b)]


class PoisonStep(pl.Callback):
    """The NaN-sample experiment: at global step ``step`` (to ``last``, inclusive, if given) the output of the
    module's first Linear or Embedding (in module order: the input layer) is NaN for sample 0 of global rank 0's
    batch — one bad sample, as a bad row of data would give, in every forward of that step (CrAM's second pass
    too)."""

    def __init__(self, step: int, last: int | None = None) -> None:
        self.step, self.last, self.hits = step, step if last is None else last, 0
        self._handle = None

    def poisoned(self, trainer: pl.Trainer) -> bool:
        return self.step <= trainer.global_step <= self.last

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        first = next(m for m in pl_module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)))

        def poison(module, args, out):
            if not (module.training and self.poisoned(trainer) and trainer.global_rank == 0):
                return None
            self.hits += 1
            out = out.clone()
            out[0] = float("nan")
            return out

        self._handle = first.register_forward_hook(poison)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class InfGradient(PoisonStep):
    """A finite loss whose gradient is infinite at one element — element 0 of global rank 0's local gradient of
    the first parameter (under FSDP2 its own shard; under DDP after the reduction) — at global step ``step``:
    only that rank can see it."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not (self.poisoned(trainer) and trainer.global_rank == 0):
            return
        grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
        _local_view(grad).view(-1)[0] = float("inf")
        self.hits += 1


def _local_view(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def drop_batch(data: pl.LightningDataModule, index: int) -> pl.LightningDataModule:
    """``data`` whose training sampler leaves out batch ``index`` of the first epoch on every rank (the global batch
    ``index``): the reference of the NaN-sample experiment, the run whose bad batch was removed. Calibration reads
    the same loader: ``index`` must come after the batches an adapter calibrates on (8 for EVA). The loader stays a
    ``DataLoader`` with the suite's ``ResumableSampler`` (a subclass of it, made here), so Lightning treats it as
    it treats the original under every strategy."""
    original = data.train_dataloader

    def train_dataloader():
        loader = original()
        sampler = loader.sampler
        base, size = type(sampler), sampler.batch_size

        class WithoutOneBatch(base):
            def __iter__(self):
                indices = list(base.__iter__(self))
                if self.epoch == 0:
                    start = index * size - self.consumed_batches * size
                    indices = indices[:max(start, 0)] + indices[max(start + size, 0):]
                return iter(indices)

            def __len__(self) -> int:
                return base.__len__(self) - (size if self.epoch == 0 else 0)

        sampler.__class__ = WithoutOneBatch
        return loader

    data.train_dataloader = train_dataloader
    return data


def nonfinite_run(entry: Entry, root: Path, steps: int, at: int, reference: bool,
                  callbacks: Sequence[pl.Callback] = (), **kwargs: Any) -> pl.Trainer:
    """One side of the NaN-sample experiment. ``reference=False``: ``entry`` for ``steps`` steps with one NaN
    sample at step ``at`` (:class:`PoisonStep`, unless ``callbacks`` bring their own; the guard on, as by default: added here for the baseline entry,
    which has no technique callback). ``reference=True``: ``steps - 1`` steps without that batch, the schedules
    keyed on the global step (QuEST's ``start_step``, LossReweighting's ``warmup_steps``) one step earlier: the
    guarded run's global step counts the skipped step (see lightning_ext.callbacks.nonfinite)."""
    from lightning_ext.callbacks import LossReweighting, NonFiniteGuard, QuEST

    pl.seed_everything(0, verbose=False)
    model, data = entry.model(), entry.data()
    if reference:
        trainer = make_trainer(entry, root / "reference", steps - 1, list(callbacks), **kwargs)
        data = drop_batch(data, at)
        for cb in trainer.callbacks:
            if isinstance(cb, QuEST) and cb.start_step > at:
                cb.start_step -= 1
            if isinstance(cb, LossReweighting) and cb.warmup_steps > at:
                cb.warmup_steps -= 1
    else:
        added = [] if any(isinstance(cb, NonFiniteGuard) for cb in callbacks) else [NonFiniteGuard()]
        added += [] if any(isinstance(cb, PoisonStep) for cb in callbacks) else [PoisonStep(at)]
        trainer = make_trainer(entry, root / "guarded", steps, [*callbacks, *added], **kwargs)
    trainer.fit(model, datamodule=data)
    return trainer
