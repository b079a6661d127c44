"""QuEST's claims, reproduced on a character LM over the standard library's source (Panferov et al., ICML 2025):
W4A4 QuEST trains to within ~0.02 bits/char of full precision, and at 1 bit QuEST (Hadamard + Gaussian scale +
trust) beats max-scaling with a straight-through estimator.

    python -m lightning_ext.claims.quest [--seeds 2] [--steps 500]

Model (spec qat.md §7.3): ``CharContextMLP`` — Embedding(128, 32) x 16 characters -> full-precision
Linear(512 -> 256) -> 2 pre-norm residual blocks Linear(256 -> 512) -> GELU -> Linear(512 -> 256) (these four
linears quantized, weights and inputs) -> full-precision head. AdamW, one-cycle lr 2e-3, batch 128. Paired seeds:
every setting starts from the same weights and sees the same batches. Reported: validation bits per character
on 50k held-out positions (files never trained on).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from lightning_ext.data.stdlib_chars import stdlib_context_windows
from lightning_ext.models import CharContextMLP
from lightning_ext.nn.quest import apply_quest

QUANTIZED = ["blocks.0.fc1", "blocks.0.fc2", "blocks.1.fc1", "blocks.1.fc2"]
SETTINGS = {
    "FP32": None,
    "W4A4 QuEST": dict(weight_bits=4, act_bits=4),
    "W4A4 absmax-STE": dict(weight_bits=4, act_bits=4, hadamard=False, scale="absmax", trust_scale=None),
    "W1A1 QuEST": dict(weight_bits=1, act_bits=1),
    "W1A1 absmax-STE": dict(weight_bits=1, act_bits=1, hadamard=False, scale="absmax", trust_scale=None),
}


def train_sampled(model, xt, yt, steps: int, seed: int, batch: int = 128, lr: float = 2e-3) -> None:
    """AdamW (weight decay 0.01) with a one-cycle schedule on random batches (seeded by ``1000 + seed``)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(1000 + seed)
    for _ in range(steps):
        idx = torch.randint(0, xt.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def train_bpc(setting: dict | None, seed: int, steps: int, data, batch: int = 128, lr: float = 2e-3) -> float:
    (xt, yt), (xv, yv) = data
    torch.manual_seed(seed)
    model = CharContextMLP()
    if setting is not None:
        apply_quest(model, targets=QUANTIZED, **setting)
    train_sampled(model, xt, yt, steps, seed, batch, lr)
    model.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(model(xv[i:i + 4096]), yv[i:i + 4096], reduction="sum").item()
                    for i in range(0, xv.shape[0], 4096))
    return total / xv.shape[0] / math.log(2)


def run(seeds: int = 2, steps: int = 500, settings: list[str] | None = None) -> dict[str, list[float]]:
    (xt, yt), (xv, yv) = stdlib_context_windows()
    pick = torch.randperm(xv.shape[0], generator=torch.Generator().manual_seed(0))[:50_000]
    data = ((xt, yt), (xv[pick], yv[pick]))
    return {name: [train_bpc(SETTINGS[name], seed, steps, data) for seed in range(seeds)]
            for name in (settings or list(SETTINGS))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    results = run(args.seeds, args.steps)
    fp = results["FP32"]
    print(f"| setting | {' | '.join(f'seed {s}' for s in range(args.seeds))} | mean | vs FP32 |")
    print(f"|---|{'---|' * args.seeds}---|---|")
    for name, bpcs in results.items():
        gap = statistics.mean(b - f for b, f in zip(bpcs, fp))
        print(f"| {name} | {' | '.join(f'{b:.3f}' for b in bpcs)} | {statistics.mean(bpcs):.3f} | {gap:+.3f} |")
    w4 = statistics.mean(abs(q - f) for q, f in zip(results["W4A4 QuEST"], fp))
    w1 = statistics.mean(a - q for q, a in zip(results["W1A1 QuEST"], results["W1A1 absmax-STE"]))
    print(f"\nW4A4 QuEST |gap to FP32|: {w4:.3f} bpc (claim: within ~0.02)")
    print(f"W1A1: QuEST better than absmax-STE by {w1:.3f} bpc (claim: better)")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
