"""AdamP's claim, reproduced: it stops the norm growth of scale-invariant weights that AdamW shows.

    python -m lightning_ext.claims.adamp [--seeds 3] [--epochs 60]

Digits, a 64-256-256-10 MLP with BatchNorm after each hidden Linear (so their weights are
scale-invariant), lr 3e-3, no weight decay (norm growth then comes from the optimizer alone),
paired seeds. Prints ||W_T|| / ||W_0|| of both BN-preceded layers, test accuracy and NLL.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.optimizers import AdamP

OPTIMIZERS = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.0),
    "AdamP": lambda p: AdamP(p, lr=3e-3, weight_decay=0.0),
}


def run(optimizer: str, seed: int, epochs: int = 60, batch_size: int = 64) -> dict[str, float]:
    x, y = load_digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[:360], perm[360:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(),
                          nn.Linear(256, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    w0 = [model[i].weight.detach().norm().item() for i in (0, 3)]
    opt = OPTIMIZERS[optimizer](model.parameters())
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(x[test])
    return {"w1_ratio": model[0].weight.norm().item() / w0[0], "w2_ratio": model[3].weight.norm().item() / w0[1],
            "acc": (logits.argmax(1) == y[test]).float().mean().item(),
            "nll": nn.functional.cross_entropy(logits, y[test]).item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    print(f"| optimizer | ‖W1‖ ratio | ‖W2‖ ratio | test acc | test NLL |  ({args.seeds} seeds, {args.epochs} epochs)")
    print("|---|---|---|---|---|")
    for name in OPTIMIZERS:
        runs = [run(name, seed, args.epochs) for seed in range(args.seeds)]
        mean = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        sd = statistics.pstdev(r["acc"] for r in runs)
        print(f"| {name} | {mean['w1_ratio']:.3f} | {mean['w2_ratio']:.3f} | {mean['acc']:.3f} ± {sd:.3f} "
              f"| {mean['nll']:.3f} |")


if __name__ == "__main__":
    main()
