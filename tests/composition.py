"""Techniques stacked: one registry entry per pair of techniques (and a few triples), on one model.

Issue 15 item 5. The ten techniques, by kind: optimizer (AdamP, FAdam), optimizer wrapper (LAWN, CrAM), surgery
(QuEST, OneBit, WeightCompander, LoRA), loss transform (LossReweighting), continual learning (CLNP). Every pair
but the two optimizers (a model has one) is an entry; ``EXPECTED`` says what each does — ``"train"`` (trains,
resumes bit-exactly, 2 DDP ranks agree: tests/test_composition.py) or the regex of its refusal at setup, which
must name both techniques. The README's composition table is :func:`readme_table` of ``EXPECTED``, and a test
checks that the README holds it.

The model is the continual-learning MLP (CLNP needs its task heads; every other technique works on any model):
``64 -> 32 -> 32 -> 32`` (Linear ``net.0``, ``net.2``, ``net.4``, each followed by ReLU) and the head of task 0
only (under DDP every parameter must take part in the loss), on task 0 of split digits. Each surgery has a layer of its own, so that two surgeries compose rather than
collide: LoRA on ``net.0``, QuEST on ``net.2``, OneBit on ``net.4``; WeightCompander reparameterizes every
Linear it finds (the layers others replaced included, where it can). The base optimizer is AdamW unless the pair
names AdamP or FAdam.

    python tests/composition.py    # print the README table
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from lightning_ext.callbacks import CLNP, LAWN, CrAM, LoRA, LossReweighting, OneBit, QuEST, WeightCompander
from lightning_ext.data import SplitDigitsDataModule
from lightning_ext.models import ContinualMLP
from registry import Entry


class ComposedMLP(ContinualMLP):
    """:class:`~lightning_ext.models.ContinualMLP` (3 hidden layers of 32, the head of task 0: DDP needs every parameter used) trained by the optimizer at
    ``optimizer`` (a class path: hyper-parameters in checkpoints must load with ``weights_only=True``)."""

    def __init__(self, optimizer: str = "torch.optim.AdamW", **optimizer_args) -> None:
        super().__init__(hidden=[32, 32, 32], num_tasks=1)
        self.optimizer_path, self.optimizer_args = optimizer, optimizer_args

    def configure_optimizers(self) -> torch.optim.Optimizer:
        module, _, name = self.optimizer_path.rpartition(".")
        return getattr(importlib.import_module(module), name)(self.parameters(), **self.optimizer_args)


@dataclass(frozen=True)
class Technique:
    name: str
    kind: str
    #: the model's optimizer (class path, arguments), for the optimizer kind
    optimizer: tuple[str, dict] | None = None
    callbacks: Callable[[], list[pl.Callback]] = list


TECHNIQUES = [
    Technique("AdamP", "optimizer", ("lightning_ext.optimizers.AdamP", dict(lr=3e-3, weight_decay=1e-2))),
    Technique("FAdam", "optimizer", ("lightning_ext.optimizers.FAdam", dict(lr=3e-3))),
    Technique("LAWN", "wrapper", callbacks=lambda: [LAWN(free_steps=4, layers=["net.2"])]),
    Technique("CrAM", "wrapper", callbacks=lambda: [CrAM(rho=0.05, sparsities=[0.5, 0.7, 0.9])]),
    Technique("QuEST", "surgery", callbacks=lambda: [QuEST(bits=4, targets=["net.2"], start_step=4, block=32)]),
    Technique("OneBit", "surgery", callbacks=lambda: [OneBit(targets=["net.4"], hidden_modules=["net.5"])]),
    Technique("WeightCompander", "surgery", callbacks=lambda: [WeightCompander(hyper_lr=1e-2)]),
    Technique("LoRA", "surgery", callbacks=lambda: [LoRA(r=4, attr="net", target_modules="0")]),
    Technique("LossReweighting", "loss", callbacks=lambda: [LossReweighting(strategy="linupper", r=0.4,
                                                                            warmup_steps=4)]),
    Technique("CLNP", "continual", callbacks=lambda: [CLNP(l1=1e-3, margin=0.015)]),
]
BY_TECHNIQUE = {t.name: t for t in TECHNIQUES}
BASE_OPTIMIZER = ("torch.optim.AdamW", dict(lr=1e-2))


def composed_entry(*names: str, steps: int = 12, resume_at: int = 5) -> Entry:
    """The entry that stacks the techniques ``names`` (in that callback order) on :class:`ComposedMLP`."""
    techniques = [BY_TECHNIQUE[n] for n in names]
    optimizers = [t.optimizer for t in techniques if t.optimizer is not None]
    if len(optimizers) > 1:
        raise ValueError(f"{' + '.join(names)}: a model has one optimizer")
    path, args = optimizers[0] if optimizers else BASE_OPTIMIZER

    def callbacks() -> list[pl.Callback]:
        return [c for t in techniques for c in t.callbacks()]

    return Entry(name="+".join(names), model=lambda: ComposedMLP(path, **args), callbacks=callbacks,
                 data=lambda: SplitDigitsDataModule(task=0, batch_size=8, seed=0), steps=steps, resume_at=resume_at)


PAIRS = [(a.name, b.name) for a, b in itertools.combinations(TECHNIQUES, 2)
         if not (a.optimizer is not None and b.optimizer is not None)]
#: recipes a practitioner would use, run under DeepSpeed ZeRO-2 (tests/test_composition.py)
TRIPLES = [("AdamP", "QuEST", "LossReweighting"), ("FAdam", "LoRA", "LossReweighting"),
           ("CrAM", "WeightCompander", "LossReweighting")]
#: under ZeRO-2: the triples, and AdamP over two param groups. With the compander the optimizer has two (its α, β
#: are a group of their own), which DeepSpeed steps one call each, handing the optimizer one group at a time
ZERO2 = [*TRIPLES, ("AdamP", "WeightCompander")]

#: the pairs that refuse at setup: the regex of the refusal, and why (for the README)
REFUSALS: dict[tuple[str, str], tuple[str, str]] = {
    ("QuEST", "CLNP"): (r"CLNP and QuEST both rewrite 'net\.2'",
                        "both replace the same Linear layer (CLNP takes every hidden Linear)"),
    ("OneBit", "CLNP"): (r"CLNP and OneBit do not compose",
                         "a OneBit layer is not a Linear: CLNP could not prune or freeze its neurons"),
    ("WeightCompander", "CLNP"): (r"CLNP and WeightCompander both rewrite 'net\.0'",
                                  "both rewrite every hidden Linear (a reparameterized weight cannot be masked)"),
    ("LoRA", "CLNP"): (r"CLNP and LoRA do not compose",
                       "the adapter's low-rank factors would read as layers of CLNP's chain"),
    ("LAWN", "WeightCompander"): (r"LAWN and WeightCompander do not compose on 'net\.2'",
                                  "the compander makes LAWN's weight a function of other parameters, and LAWN "
                                  "constrains a weight parameter's norm (before, LAWN was silently dropped)"),
}
#: what each pair does: "train", or the regex of its refusal (naming both techniques)
EXPECTED: dict[tuple[str, str], str] = {pair: REFUSALS[pair][0] if pair in REFUSALS else "train" for pair in PAIRS}

ENTRIES = [composed_entry(*names) for names in [*PAIRS, *ZERO2]]
BY_NAME = {e.name: e for e in ENTRIES}


def active_techniques(trainer: pl.Trainer) -> set[str]:
    """The techniques that acted in a fit, read from what each leaves behind: the optimizer stack (AdamP, FAdam,
    LAWN, CrAM), the modules a surgery installed or reparameterized (their ``surgery_technique``), peft's adapter
    layers (LoRA), LossReweighting's logged sample-weight diagnostics."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from lightning_ext.surgery import technique_of

    found, optimizer = set(), trainer.optimizers[0]
    while optimizer is not None:
        found.add(type(optimizer).__name__)
        optimizer = getattr(optimizer, "base", None)
    for module in trainer.lightning_module.modules():
        owner = technique_of(module)
        if owner is not None:
            found.add(owner)
        if isinstance(module, BaseTunerLayer):
            found.add("LoRA")
    if any(key.startswith("reweight/") for key in trainer.callback_metrics):
        found.add("LossReweighting")
    return found & set(BY_TECHNIQUE)


def readme_table() -> str:
    """The README's composition matrix: ✓ (trains, resumes exactly, ranks agree) or the refusal, per pair."""
    names = [t.name for t in TECHNIQUES]
    short = {"WeightCompander": "Compander", "LossReweighting": "Reweighting"}
    lines = ["| | " + " | ".join(short.get(n, n) for n in names[1:]) + " |",
             "|---|" + "---|" * (len(names) - 1)]
    notes: list[str] = []
    for i, a in enumerate(names[:-1]):
        cells = []
        for j, b in enumerate(names[1:], start=1):
            if j <= i:
                cells.append("")
            elif (a, b) not in EXPECTED:
                cells.append("—")
            elif EXPECTED[(a, b)] == "train":
                cells.append("✓")
            else:
                notes.append(f"{a} + {b} refuses at setup, naming both: {REFUSALS[(a, b)][1]}.")
                cells.append(f"✗{len(notes)}")
        lines.append(f"| **{short.get(a, a)}** | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("- ✓: trains, resumes bit-exactly from a mid-run checkpoint, and 2 DDP ranks end bit-identical.")
    lines.append("- —: two optimizers (a model has one).")
    lines += [f"- ✗{k}: {note}" for k, note in enumerate(notes, start=1)]
    lines.append("- Under DeepSpeed ZeRO-2 (2 processes), ranks bit-identical and equal to one process: "
                 + "; ".join(" + ".join(t) for t in ZERO2) + ".")
    return "\n".join(lines)


if __name__ == "__main__":
    print(readme_table())
