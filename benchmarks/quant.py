"""Quantized layers' cost: forward + backward of one square layer, ratio to ``nn.Linear`` (goals: QuEST fused
<= 1.5x at width 512, <= 1.2x at 1024, <= 1.1x at 2048; OneBit fused <= 1.2x at >= 1024; 2048 tokens).

    python -m benchmarks.quant [--repeats 9] [--clock {wall,cpu}] [--widths 256 512 1024 2048] [--tokens 2048]

Cases per width (float32, torch's threads):

* ``nn.Linear`` — the baseline;
* ``rotation only (matmul)`` — both operands rotated by the eager 128-block reshape-matmul, no quantizer;
* ``rotation only (butterflies)`` — the same rotation on the fused path's C++ butterfly kernel, no quantizer;
* ``QuEST W4A4 eager`` / ``fused`` — :class:`lightning_ext.nn.quest.QuestLinear` with ``fused=False`` / ``True``
  (rotation + Gaussian-scale quantizers + trust masks on weight and input);
* ``OneBit eager`` / ``fused`` — :class:`lightning_ext.nn.onebit.OneBitLinear` with ``fused=False`` / ``True``
  (sign x value vectors, tanh surrogate, LayerNorm).

The extensions are built before timing starts. ``--clock cpu`` times by the process's CPU time (a shared machine's
descheduling does not count).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.runner import benchmark_args, compare
from lightning_ext.nn.hadamard import block_hadamard
from lightning_ext.nn.onebit import OneBitLinear
from lightning_ext.nn.quest import QuestLinear
from lightning_ext.nn.quest_fused import fused_rotate


def make_cases(width: int, tokens: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(width, width)
    layers = {"quest_eager": QuestLinear.from_linear(nn.Linear(width, width), fused=False),
              "quest_fused": QuestLinear.from_linear(nn.Linear(width, width), fused=True),
              "onebit_eager": OneBitLinear.from_linear(nn.Linear(width, width), fused=False),
              "onebit_fused": OneBitLinear.from_linear(nn.Linear(width, width), fused=True)}
    params = list(linear.parameters()) + [p for m in layers.values() for p in m.parameters()]
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)

    def run(fn):
        def step():
            x.grad = None
            for p in params:
                p.grad = None
            fn().backward(grad)
        return step

    def matmul_rotation():
        return F.linear(block_hadamard(x, 128), block_hadamard(linear.weight, 128), linear.bias)

    def butterfly_rotation():
        return F.linear(fused_rotate(x, 128), fused_rotate(linear.weight, 128), linear.bias)

    return {"nn.Linear": run(lambda: linear(x)),
            "rotation only (matmul)": run(matmul_rotation),
            "rotation only (butterflies)": run(butterfly_rotation),
            "QuEST W4A4 eager": run(lambda: layers["quest_eager"](x)),
            "QuEST W4A4 fused": run(lambda: layers["quest_fused"](x)),
            "OneBit eager": run(lambda: layers["onebit_eager"](x)),
            "OneBit fused": run(lambda: layers["onebit_fused"](x))}


def main() -> None:
    import argparse
    import sys

    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024, 2048])
    extra.add_argument("--tokens", type=int, default=2048)
    own, rest = extra.parse_known_args()
    sys.argv = [sys.argv[0], *rest]
    args = benchmark_args(__doc__, clock=True)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    summary = {}
    for width in own.widths:
        results = compare(make_cases(width, own.tokens), baseline="nn.Linear", repeats=args.repeats, timer=timer,
                          title=f"fwd+bwd, {own.tokens} tokens x {width} -> {width}, {torch.get_num_threads()} "
                                f"threads, {args.clock} clock")
        summary[width] = {r.name: r.ratio for r in results}
        print()
    names = list(next(iter(summary.values())))[1:]
    print("Ratio to nn.Linear (fwd+bwd):\n")
    print("| width | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for width, ratios in summary.items():
        print(f"| {width} | " + " | ".join(f"{ratios[n]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
