"""CrAM's cost per training step (goal: <= 2.05x a plain step; two forward/backward passes make 2.0x).

    python -m benchmarks.cram [--repeats 15] [--clock {wall,cpu}]

Conv net with BatchNorm (the optimizer benchmark's) on a batch of 16 RGB 16x16 images, SGD with
momentum; CrAM+ with global top-k (sparsities 0.5/0.7/0.9) and with 2:4/4:8 N:M. ``--clock cpu`` times by the
process's CPU time (all threads): on a shared machine the wall clock also counts time the process was not
running, and its spread swamps a 2 % difference.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from benchmarks.optimizers import conv_bn_net
from benchmarks.runner import benchmark_args, compare
from lightning_ext.optimizers import CrAM


def make_step(variant: str):
    torch.manual_seed(0)
    model = conv_bn_net()
    base = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    opt = {"SGD": base, "CrAM+ top-k": CrAM(base, model=model),
           "CrAM+ N:M": CrAM(base, model=model, compression="nm")}[variant]
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    if variant == "SGD":
        return lambda: (closure(), opt.step())
    return lambda: opt.step(closure)


def main() -> None:
    args = benchmark_args(__doc__, clock=True)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    compare({v: make_step(v) for v in ("SGD", "CrAM+ top-k", "CrAM+ N:M")}, baseline="SGD", repeats=args.repeats,
            timer=timer, title=f"training step, conv net + BN (2.3 M params), batch 16 x 16x16, "
                               f"{torch.get_num_threads()} threads, {args.clock} clock")


if __name__ == "__main__":
    main()
