"""CrAM's claim, reproduced: after CrAM+ training a one-shot magnitude prune keeps far more accuracy
than the same prune after SGD — no retraining.

    python -m lightning_ext.claims.cram [--seeds 2] [--bn]

Digits, MLP 64-256-256-10 (``--bn``: BatchNorm after each hidden Linear, then BatchNorm
re-calibration on 512 training samples after pruning), SGD lr 0.05, momentum 0.9, wd 5e-4, cosine
schedule, batch 64; CrAM+ Multi over sparsities {0.5, 0.7, 0.9} around the same SGD. Then one-shot
global magnitude pruning of the weight matrices at each sparsity; test accuracy. Paired seeds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.nn import one_shot_prune, recalibrate_batchnorm
from lightning_ext.optimizers import CrAM

SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)


def train(method: str, seed: int, bn: bool = False, epochs: int = 40, rho: float = 0.05) -> dict[float, float]:
    x, y = load_digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train_idx = perm[:360], perm[360:]
    torch.manual_seed(seed)

    def block(i, o):
        return [nn.Linear(i, o), nn.BatchNorm1d(o), nn.ReLU()] if bn else [nn.Linear(i, o), nn.ReLU()]

    model = nn.Sequential(*block(64, 256), *block(256, 256), nn.Linear(256, 10))
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt = CrAM(base, model=model, rho=rho, sparsities=(0.5, 0.7, 0.9), seed=seed) if method == "CrAM+" else base
    steps_per_epoch = len(train_idx) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=g)]
        for i in range(steps_per_epoch):
            idx = order[i * 64:(i + 1) * 64]

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss

            if method == "CrAM+":
                opt.step(closure)
            else:
                closure()
                opt.step()
            sched.step()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    accuracy = {}
    for s in SPARSITIES:
        model.load_state_dict(dense)
        if s > 0:
            one_shot_prune(model, s)
        if bn:
            calib = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(1))[:512]]
            recalibrate_batchnorm(model, [x[calib[i:i + 128]] for i in range(0, 512, 128)])
        model.eval()
        with torch.no_grad():
            accuracy[s] = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        model.train()
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--bn", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--rho", type=float, default=0.05)
    args = parser.parse_args()
    print(f"test accuracy after one-shot pruning ({args.seeds} seeds, {args.epochs} epochs, rho {args.rho}"
          f"{', BatchNorm + re-calibration' if args.bn else ''})")
    print("| method | " + " | ".join(f"{int(s * 100)} %" for s in SPARSITIES) + " |")
    print("|---|" + "---|" * len(SPARSITIES))
    for method in ("SGD", "CrAM+"):
        runs = [train(method, seed, args.bn, args.epochs, args.rho) for seed in range(args.seeds)]
        print(f"| {method} | " + " | ".join(f"{statistics.mean(r[s] for r in runs):.3f}" for s in SPARSITIES) + " |")


if __name__ == "__main__":
    main()
