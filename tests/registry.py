"""One entry per technique; the cross-cutting tests (resume, ranks, config, DeepSpeed) run over all.

An entry is the smallest setup that exercises the technique: a model, a datamodule, the
technique's callbacks (or an optimizer chosen by the model), and its YAML under ``configs/``.
Technique issues add an entry here; the cross-cutting tests pick it up without changes.
Composer's ``algorithm_settings.py`` and peft's table-driven tests are the models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import lightning.pytorch as pl

import importlib

import torch

from lightning_ext.callbacks import (CLNP, EVA, LAWN, Bone, CrAM, GoRA, LoRA, LossReweighting, LoTR, OneBit, QuEST,
                                     WeightCompander)
from lightning_ext.data import DigitsDataModule, SplitDigitsDataModule, TweetSentimentDataModule
from lightning_ext.models import ContinualMLP, MLPClassifier, TextClassifier


@dataclass(frozen=True)
class Entry:
    name: str
    model: Callable[[], pl.LightningModule]
    data: Callable[[], pl.LightningDataModule]
    callbacks: Callable[[], list[pl.Callback]] = list
    #: YAML under configs/ that uses the technique (round-trip and 2-step fit are tested)
    config: str | None = None
    #: per ZeRO stage: "train" (trains, ranks agree) or a regex the refusal message must match
    deepspeed: Mapping[int, str] = field(default_factory=lambda: {1: "train", 2: "train", 3: "train"})
    #: total steps, and where the resume test stops (mid-epoch on purpose)
    steps: int = 30
    resume_at: int = 13
    #: precision in which a 2-process DDP run is compared with one process (tests/test_ranks.py)
    equality_precision: str = "32-true"
    #: what a 2-process DeepSpeed run (fp32) is compared with (tests/test_deepspeed.py): "one_process" on the
    #: global batch, or "ddp" (2 DDP processes, themselves equal to one process in ``equality_precision``)
    sharded_reference: str = "one_process"
    #: accumulate_grad_batches=2: "equal" (to the doubled batch, tests/test_accumulation.py) or the refusal's regex
    accumulation: str = "equal"
    #: under FSDP2 (fsdp_cpu, tests/test_fsdp.py): "train" (equal to ``sharded_reference``) or the refusal's regex
    fsdp: str = "train"
    #: under DeepSpeed (ZeRO-2) in bf16-mixed, which keeps bf16 weights: "train" or the refusal's regex
    deepspeed_bf16: str = "train"


class MLPWith(MLPClassifier):
    """The demo MLP trained by a given optimizer, with LayerNorm after the hidden Linear (so a scale-invariant
    weight exists for AdamP/SGDP's projection, and each sample is normalised alone: 2 ranks of 32 compute what
    one process computes on the batch of 64, which BatchNorm's per-rank batch statistics would not)."""

    def __init__(self, optimizer: str, batch_norm: bool = False, **optimizer_args) -> None:
        # a class path, not a class: hyper-parameters in checkpoints must load with weights_only=True
        super().__init__(hidden=[32], batch_norm=batch_norm, layer_norm=not batch_norm)
        self.optimizer_path, self.optimizer_args = optimizer, optimizer_args

    def configure_optimizers(self) -> torch.optim.Optimizer:
        module, _, name = self.optimizer_path.rpartition(".")
        return getattr(importlib.import_module(module), name)(self.parameters(), **self.optimizer_args)


#: the per-tensor optimizers (AdamP, SGDP, FAdam) compute their statistics exactly on ZeRO-1/2/3 partitions
#: (shard_layout.py): their entries train under every stage


def _digits() -> DigitsDataModule:
    # 1,617 training samples / 64 = 25 batches per epoch: 30 steps cross an epoch boundary
    return DigitsDataModule(batch_size=64, seed=0)


def _text_model() -> TextClassifier:
    return TextClassifier(dropout=0.0)  # dropout's RNG stream is not part of a checkpoint


def _tweets() -> TweetSentimentDataModule:
    return TweetSentimentDataModule(batch_size=16, seed=0)


REGISTRY: list[Entry] = [
    Entry(
        name="baseline_adamw",
        model=lambda: MLPClassifier(hidden=[32], lr=1e-2, weight_decay=0.01),
        data=_digits,
        config="configs/baseline.yaml",
    ),
    Entry(name="adamp", data=_digits, config="configs/optimizers/adamp.yaml",
          model=lambda: MLPWith("lightning_ext.optimizers.AdamP", lr=3e-3, weight_decay=1e-2, nesterov=True)),
    Entry(name="sgdp", data=_digits, config="configs/optimizers/sgdp.yaml",
          model=lambda: MLPWith("lightning_ext.optimizers.SGDP", lr=0.05, momentum=0.9, weight_decay=1e-4,
                                nesterov=True)),
    Entry(name="fadam", data=_digits, model=lambda: MLPWith("lightning_ext.optimizers.FAdam", lr=3e-3),
          config="configs/optimizers/fadam.yaml"),
    # free phase ends at step 10: the resume test stops (13) and resumes inside the constrained phase
    Entry(name="lawn", data=_digits, config="configs/lawn.yaml",
          model=lambda: MLPClassifier(hidden=[32], layer_norm=True, lr=1e-2),
          callbacks=lambda: [LAWN(free_steps=10, layers=["net.3"])]),
    Entry(name="cram", data=_digits, config="configs/cram.yaml",
          model=lambda: MLPWith("torch.optim.SGD", lr=0.05, momentum=0.9, weight_decay=5e-4),
          callbacks=lambda: [CrAM(rho=0.05, sparsities=[0.5, 0.7, 0.9])]),
    # warm-up ends at step 20: the resume test stops (13) inside it and the run crosses into reweighting
    Entry(name="reweighting", data=_digits, config="configs/reweighting.yaml",
          model=lambda: MLPClassifier(hidden=[32], lr=1e-2),
          callbacks=lambda: [LossReweighting(strategy="linupper", r=0.4, warmup_steps=20)]),
    # task 0 of split digits (27 batches per epoch, 13 per rank on 2): trains with the activity penalty,
    # prunes and freezes
    # at the end of the fit (compared across ranks and after resume through the callback's state)
    Entry(name="clnp", config="configs/clnp.yaml",
          data=lambda: SplitDigitsDataModule(task=0, batch_size=8, seed=0),
          model=lambda: ContinualMLP(hidden=[32, 32], num_tasks=2),
          callbacks=lambda: [CLNP(l1=1e-3, margin=0.015)], fsdp=r"CLNP with FSDP is not supported",
          deepspeed_bf16=r"CLNP with DeepSpeed ZeRO stage 2 and precision='bf16-mixed' is not supported"),
    # quantization starts at step 20: the resume test stops (13) before it and resumes across the switch.
    # Compared with one process in float64: round-to-nearest is discontinuous, so in fp32 the ~1e-7 of
    # reduction-order noise between 2 ranks and one process flips a few quantized values once quantization starts
    # and the runs part by ~1e-2 after 10 steps; in float64 they agree to ~1e-14 (same arithmetic, no flips).
    # DeepSpeed has no float64: its fp32 runs are compared with the fp32 DDP run (the same gradient reduction).
    Entry(name="quest", data=_digits, config="configs/quest.yaml", equality_precision="64-true",
          sharded_reference="ddp",
          model=lambda: MLPClassifier(hidden=[128, 128], lr=1e-2),
          callbacks=lambda: [QuEST(bits=4, targets=["net.2"], start_step=20, log_every=5)]),
    Entry(name="compander", data=_digits, config="configs/compander.yaml",
          model=lambda: MLPClassifier(hidden=[32], lr=1e-2, weight_decay=0.01),
          callbacks=lambda: [WeightCompander(hyper_lr=1e-2, log_every=5)]),
    # the hidden layer becomes 1-bit (SVID at the start, not on resume) and distils from the FP model
    Entry(name="onebit", data=_digits, config="configs/onebit.yaml",
          model=lambda: MLPClassifier(hidden=[32, 32], lr=1e-2),
          callbacks=lambda: [OneBit(targets=["net.2"], hidden_modules=["net.3"])]),
    # adapters on a small random BERT over byte-tokenised tweets (the YAMLs use the pretrained MiniLM);
    # 480 training tweets / 16 = 30 batches per epoch
    Entry(name="lora", data=_tweets, config="configs/lora.yaml", model=_text_model,
          callbacks=lambda: [LoRA(r=4, modules_to_save=["classifier"])]),
    # EVA's calibrated ranks come back from the checkpoint on resume (no recalibration)
    Entry(name="eva", data=_tweets, config="configs/eva.yaml", model=_text_model,
          callbacks=lambda: [EVA(r=4, modules_to_save=["classifier"],
                                 target_modules=["query", "value", "attention.output.dense"])]),
    # GoRA's calibrated ranks and B come back from the checkpoint on resume (no recalibration); ranks agree
    # across processes because the gradient is all-reduced and A is drawn from a seeded generator
    Entry(name="gora", data=_tweets, config="configs/gora.yaml", model=_text_model,
          callbacks=lambda: [GoRA(r=4, calibration_steps=4, modules_to_save=["classifier"],
                                  target_modules=["query", "value", "attention.output.dense"])]),
    Entry(name="lotr", data=_tweets, config="configs/lotr.yaml", model=_text_model,
          callbacks=lambda: [LoTR(r=8, modules_to_save=["classifier"])]),
    Entry(name="bone", data=_tweets, config="configs/bone.yaml", model=_text_model,
          callbacks=lambda: [Bone(r=16, mode="bat", modules_to_save=["classifier"])]),
]

#: settings checked under one strategy only (not in the cross-cutting tests): named by tests/scripts/run_entries.py
VARIANTS: list[Entry] = [
    # N:M compression (2:4 or 4:8 per step): the head's rows of 36 inputs hold 4.5 groups of 8, so 4:8 groups
    # straddle rows (FSDP2 gathers that tensor) and ZeRO-3's partition boundary (its 360 weights cut at 180).
    # Choosing N of M is discontinuous, as QuEST's rounding is: 2 DDP processes equal one process in float64
    # (2e-16) but part by 4e-2 in fp32, where reduction-order noise flips choices; so the sharded fp32 runs are
    # compared with the fp32 DDP run
    Entry(name="cram_nm", data=_digits, model=lambda: MLPClassifier(hidden=[36], layer_norm=True, lr=1e-2),
          equality_precision="64-true", sharded_reference="ddp",
          callbacks=lambda: [CrAM(rho=0.05, compression="nm")]),
    # the cram entry's model and SGD without CrAM: the floor CrAM's own sharded runs are held to where the
    # arithmetic is not fp32 (bf16-mixed: tests/test_sharded_accumulation.py)
    Entry(name="sgd", data=_digits, model=lambda: MLPWith("torch.optim.SGD", lr=0.05, momentum=0.9, weight_decay=5e-4)),
]

BY_NAME = {e.name: e for e in REGISTRY + VARIANTS}
