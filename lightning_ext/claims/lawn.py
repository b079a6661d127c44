"""LAWN's mechanism, reproduced: a bounded head norm keeps the logits (and the loss) from collapsing.

    python -m lightning_ext.claims.lawn [--seeds 2] [--steps 600] [--free-steps 60]

Digits, BN-MLP 64-256-256-10 with a bias-free head (the final homogeneous sub-network), full-batch
Adam (lr 1e-3: the large-batch regime where the paper reports its gains), with and without LAWN on
the head; AdamW (weight decay 0.1 in torch's units) as the usual alternative. Paired seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.optimizers import LAWN


def run(variant: str, seed: int, steps: int = 600, free_steps: int = 60) -> dict[str, float]:
    x, y = load_digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256),
                          nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10, bias=False))
    if variant == "AdamW":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        if variant == "Adam + LAWN":
            opt = LAWN(opt, [model[6].weight], free_steps=free_steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[train]), y[train])
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x[test])
        train_loss = nn.functional.cross_entropy(model(x[train]), y[train]).item()
    return {"acc": (logits.argmax(1) == y[test]).float().mean().item(),
            "nll": nn.functional.cross_entropy(logits, y[test]).item(), "train_loss": train_loss,
            "logit_norm": logits.norm(dim=1).mean().item(), "head_norm": model[6].weight.norm().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--free-steps", type=int, default=60)
    args = parser.parse_args()
    print(f"({args.seeds} seeds, {args.steps} full-batch steps, free phase {args.free_steps})")
    print("| variant | test acc | test NLL | final train loss | mean ‖logits‖ | ‖W_head‖ |")
    print("|---|---|---|---|---|---|")
    for variant in ("Adam", "Adam + LAWN", "AdamW"):
        runs = [run(variant, s, args.steps, args.free_steps) for s in range(args.seeds)]
        m = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        print(f"| {variant} | {m['acc']:.3f} | {m['nll']:.3f} | {m['train_loss']:.1e} | {m['logit_norm']:.1f} "
              f"| {m['head_norm']:.2f} |")


if __name__ == "__main__":
    main()
