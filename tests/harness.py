"""Helpers for the cross-cutting tests: build a trainer for a registry entry, snapshot, compare."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    """At the end of training, every rank writes its weights and technique state to ``out/rank<r>.pt``.

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
                 "global_step": trainer.global_step, "world_size": trainer.world_size}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")


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


SCRIPT = Path(__file__).parent / "scripts" / "run_entry.py"


def run_entry(entry: Entry, out: Path, strategy: str, *extra: str):
    """Train ``entry`` on 2 processes of ``strategy`` through ``scripts/run_entry.py`` (strategies whose launcher
    re-runs the script: DeepSpeed, FSDP2); each rank's state lands in ``out``."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(SCRIPT), entry.name, str(out), "--strategy", strategy, "--devices",
                           "2", *extra], cwd=out.parent, capture_output=True, text=True, timeout=480)


def errors_of(out: Path) -> list[str]:
    return [e.read_text() for e in sorted(Path(out).glob("error*.txt"))] if Path(out).exists() else []


def sharded_difference(entry: Entry, out: Path, proc, root: Path) -> float:
    """Check a 2-process sharded run of ``entry`` (``run_entry``): it ended cleanly, the ranks agree bit for bit,
    the weights are finite and moved; returns max |its full weights - the reference| (``entry.sharded_reference``:
    one process on the global batch, or 2 DDP processes)."""
    errors = errors_of(out)
    assert proc.returncode == 0 and not errors, proc.stdout[-3000:] + proc.stderr[-3000:] + "".join(errors)
    r0, r1 = rank_states(out, 2)
    assert r0["world_size"] == 2 and r0["global_step"] == entry.steps
    assert differences(r0, r1) == []
    assert all(torch.isfinite(p).all() for p in r0["params"].values())
    initial = initial_parameters(entry, root / "initial")  # after setup, before any step
    common = [n for n in initial if n in r0["params"]]
    assert common and any(not torch.equal(r0["params"][n], initial[n]) for n in common), "nothing trained"
    if entry.sharded_reference == "ddp":  # 2 DDP processes, equal to one process in float64 (test_ranks)
        reference = ddp_rank_states(entry, root / "ddp")[0]["params"]
    else:  # one process, unsharded, on the global batch
        reference = one_process_parameters(entry, root / "one", 2)
    return worst_difference(r0["params"], reference)


def refusal_of(out: Path, proc, expected: str) -> str:
    """The first line of the refusal a sharded run wrote (asserted to match ``expected``)."""
    import re

    errors = errors_of(out)
    assert errors, f"expected a refusal matching {expected!r}; run ended with rc={proc.returncode}"
    message = errors[0].splitlines()[0]
    assert re.search(expected, message), message
    return message
