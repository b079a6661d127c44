"""CLNP's claim, reproduced: zero forgetting by construction, with free capacity left for later tasks,
against naive sequential fine-tuning (Golkar, Kagan, Cho 2019, arXiv 1903.04476).

    python -m lightning_ext.claims.clnp [--epochs 60] [--seeds 2]

Split digits: five 2-class tasks {0,1}, ..., {8,9}, each class split 60/20/20 train/val/test. MLP
64 -> 128 -> 128 (ReLU) with one 2-way head per task, Adam lr 3e-3, 60 epochs per task, batch 32; one
``trainer.fit`` per task. CLNP: activation L1 (lambda 1e-3), pruning margin 1.5 % on validation
accuracy. Naive: the same network and schedule without CLNP (shared trunk, per-task heads). Reported:
test accuracy of every task at the end, whether each earlier head's test logits stayed bit-identical
after every later task, and the free-capacity table; then lambda's effect on free capacity.
"""

from __future__ import annotations

import argparse
import logging
import statistics

import lightning.pytorch as pl
import torch

from lightning_ext.callbacks import CLNP
from lightning_ext.continual import fit_task_sequence
from lightning_ext.data import SplitDigitsDataModule
from lightning_ext.models import ContinualMLP

TASKS = 5


def _trainer(callbacks, epochs: int) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                      check_val_every_n_epoch=10_000, callbacks=callbacks)


def _test_set(task: int):
    return SplitDigitsDataModule(task=task).splits(task)["test"].tensors


@torch.no_grad()
def logits(model: ContinualMLP, task: int) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(_test_set(task)[0], task)
    model.train(was)
    return out


def accuracy(model: ContinualMLP, task: int) -> float:
    return (logits(model, task).argmax(-1) == _test_set(task)[1]).float().mean().item()


def run(method: str, seed: int = 0, epochs: int = 60, l1: float = 1e-3, margin: float = 0.015) -> dict:
    pl.seed_everything(seed, verbose=False)
    model = ContinualMLP(hidden=[128, 128], num_tasks=TASKS)
    datamodules = [SplitDigitsDataModule(task=t) for t in range(TASKS)]
    snapshots, just_trained, identical = {}, {}, []

    def after(task, m):
        snapshots[task] = logits(m, task)
        just_trained[task] = accuracy(m, task)
        identical.extend(torch.equal(snapshots[old], logits(m, old)) for old in range(task))

    if method == "CLNP":
        clnp = CLNP(l1=l1, margin=margin, seed=seed)
        fit_task_sequence(model, datamodules, lambda t: _trainer([clnp], epochs), clnp, after_task=after)
        history = clnp.state["history"]
    else:
        for task, dm in enumerate(datamodules):
            _trainer([], epochs).fit(model, datamodule=dm)
            after(task, model)
        history = []
    final = [accuracy(model, t) for t in range(TASKS)]
    return {"final": final, "mean": statistics.fmean(final), "just_trained": [just_trained[t] for t in range(TASKS)],
            "identical": identical, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.use_deterministic_algorithms(True)
    runs = {(m, seed): run(m, seed, args.epochs) for seed in range(args.seeds) for m in ("CLNP", "naive")}
    print("| method | seed | test acc per task at the end | mean | largest drop from just-trained | "
          "old heads bit-identical |")
    print("|---|---|---|---|---|---|")
    for (m, seed), r in runs.items():
        drop = max(j - f for j, f in zip(r["just_trained"], r["final"]))
        same = f"{sum(r['identical'])}/{len(r['identical'])}"
        print(f"| {m} | {seed} | {' / '.join(f'{a:.3f}' for a in r['final'])} | {r['mean']:.3f} | {drop:.3f} | "
              f"{same} |")
    for m in ("CLNP", "naive"):
        print(f"mean over seeds, {m}: {statistics.fmean(runs[(m, s)]['mean'] for s in range(args.seeds)):.3f}")
    results = {"CLNP": runs[("CLNP", 0)]}
    print("\nCLNP, seed 0, per task (new = allocated to the task, reused = old neurons it reads, free = left):")
    print("| task | val acc before -> after prune | L1 new | L1 reused | L1 free | L2 new | L2 reused | L2 free |")
    print("|---|---|---|---|---|---|---|---|")
    for h in results["CLNP"]["history"]:
        a, b = h["layers"]
        print(f"| {h['task']} | {h['val_acc_before']:.3f} -> {h['val_acc_after']:.3f} | {a['new']} | {a['reused']} | "
              f"{a['free']} | {b['new']} | {b['reused']} | {b['free']} |")
    print("\n| lambda | L2 free after 5 tasks | mean test acc |")
    print("|---|---|---|")
    for l1 in (0.0, 1e-3, 3e-3):
        r = results["CLNP"] if l1 == 1e-3 else run("CLNP", 0, args.epochs, l1=l1)
        print(f"| {l1:g} | {r['history'][-1]['layers'][1]['free']} | {r['mean']:.3f} |")


if __name__ == "__main__":
    main()
