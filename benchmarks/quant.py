"""QuEST layer cost: forward + backward of one linear (goal: whole QuEST layer <= 1.5x nn.Linear at width >= 1024,
2048 tokens).

    python -m benchmarks.quant [--repeats 9]

Cases per width (square layer, float32, 2 threads unless the machine has fewer):

* ``nn.Linear`` — the baseline;
* ``blocked rotation only`` — both operands rotated by the 128-block reshape-matmul, no quantizer;
* ``dense rotation only`` — both operands multiplied by the dense ``in x in`` block-diagonal matrix (the
  reference code's approach), no quantizer;
* ``QuEST W4A4`` — :class:`lightning_ext.nn.quest.QuestLinear`: rotation + Gaussian-scale quantizers + trust
  masks on weight and input;
* ``QuEST W4A4 dense rotation`` — the same quantizers with the dense rotation (what the reference pays).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.runner import benchmark_args, compare
from lightning_ext.nn.hadamard import hadamard_matrix
from lightning_ext.nn.quest import QuestLinear, trust_quantize


def make_cases(width: int, tokens: int) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(width, width)
    quest = QuestLinear.from_linear(nn.Linear(width, width), weight_bits=4, act_bits=4)
    dense_h = torch.block_diag(*[hadamard_matrix(128)] * (width // 128))
    x = torch.randn(tokens, width, requires_grad=True)
    grad = torch.randn(tokens, width)

    def run(fn):
        def step():
            x.grad = None
            for p in (linear.weight, linear.bias, quest.weight, quest.bias):
                p.grad = None
            fn().backward(grad)
        return step

    def blocked():
        w = (linear.weight.view(width, -1, 128) @ hadamard_matrix(128)).view(width, width)
        xr = (x.view(tokens, -1, 128) @ hadamard_matrix(128)).view(tokens, width)
        return F.linear(xr, w, linear.bias)

    def dense():
        return F.linear(x @ dense_h, linear.weight @ dense_h, linear.bias)

    def quest_dense():
        w = trust_quantize(linear.weight @ dense_h, 4)
        return F.linear(trust_quantize(x @ dense_h, 4), w, linear.bias)

    return {"nn.Linear": run(lambda: linear(x)), "blocked rotation only": run(blocked),
            "dense rotation only": run(dense), "QuEST W4A4": run(lambda: quest(x)),
            "QuEST W4A4 dense rotation": run(quest_dense)}


def main() -> None:
    args = benchmark_args(__doc__)
    for tokens in (2048, 256):
        for width in (512, 1024, 2048):
            compare(make_cases(width, tokens), baseline="nn.Linear", repeats=args.repeats,
                    title=f"fwd+bwd, {tokens} tokens x {width} -> {width}, {torch.get_num_threads()} threads")
            print()


if __name__ == "__main__":
    main()
