"""Weight compander's diagnostic, reproduced (Cakaj, Mehnert, Yang 2023, arXiv 2306.16993): companded training
leaves fewer near-zero weights and smaller extreme weights than plain training at the same weight decay.

    python -m lightning_ext.claims.compander [--seeds 3] [--epochs 100]

Setup (spec optimizers.md §6.8): scikit-learn's digits, 400 training samples (seeded split; the other 1,397
are the test set), MLP 64-512-512-10, AdamW lr 1e-3, weight decay 0.01, full-batch-ish mini-batches of 100,
paired seeds (same initial weights and batches). The compander is lightning_ext's default reconstruction,
``AsinhCompander`` (beta 1.5 at start, alpha = 2 std(W0) per layer, both learned in a no-decay group). Reported
per setting: test accuracy and NLL, the fraction of hidden-layer weights with ``|w| < 0.1 std(w)``, and
``max |w| / std(w)`` — the paper's "companding" histogram diagnostic, in numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_ext.nn.compander import apply_compander, compander_parameters


def data(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:400], order[400:]
    return (x[train], y[train]), (x[test], y[test])


def run(companded: bool, seed: int, epochs: int, splits) -> dict[str, float]:
    (xt, yt), (xv, yv) = splits
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    hidden = [model[0], model[2]]
    groups = [{"params": list(model.parameters()), "weight_decay": 0.01}]
    if companded:
        apply_compander(model, compander_args={"beta": 1.5, "alpha_scale": 2.0})
        hyper = {id(p) for p in compander_parameters(model)}
        groups = [{"params": [p for p in model.parameters() if id(p) not in hyper], "weight_decay": 0.01},
                  {"params": compander_parameters(model), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(yt), generator=g).split(100):
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        logits = model(xv)
        weights = [m.weight.detach().flatten() for m in hidden]
        small = statistics.mean(float((w.abs() < 0.1 * w.std()).float().mean()) for w in weights)
        peak = statistics.mean(float(w.abs().max() / w.std()) for w in weights)
        return {"acc": float((logits.argmax(1) == yv).float().mean()), "nll": float(F.cross_entropy(logits, yv)),
                "small": small, "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start, splits = time.perf_counter(), data()
    results = {name: [run(name == "compander", s, args.epochs, splits) for s in range(args.seeds)]
               for name in ("AdamW", "compander")}
    print("| setting | test acc | test NLL | frac |w| < 0.1 std | max |w| / std |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        m = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {m['acc']:.4f} | {m['nll']:.4f} | {m['small']:.4f} | {m['peak']:.2f} |")
    print(f"({args.seeds} paired seeds, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
