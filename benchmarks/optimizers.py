"""Optimizer step time: ours (each path) vs. the reference implementations vs. torch's AdamW.

    python -m benchmarks.optimizers [--repeats 15] [--quick]

Three parameter sets, gradients fixed random tensors (the optimizer step only):

* a conv net with BatchNorm (scale-invariant conv weights: AdamP/SGDP's projection applies);
* a Llama-style LM with 100+ parameter tensors (``lightning_ext.models.CharLlama``);
* 200 tensors of 64 x 64 (many small tensors, where per-kernel overheads dominate).

Ratios are against torch's fused AdamW, measured side by side in one run. ``(default)`` rows are ours as a user
writes them, with no path argument (``fused=None``: the fused kernels where they build); ``fused`` rows are our
C++ CPU kernels (compiled on first use, before timing starts). The last column of the closing summary is each
reference's time over our default's (goal: >= 3).
"""

from __future__ import annotations

import time

import adamp as adamp_ref
import pytorch_optimizer
import torch
from torch import nn

from benchmarks.runner import benchmark_args, compare
from lightning_ext.models import CharLlama
from lightning_ext.optimizers import SGDP, AdamP, FAdam


def conv_bn_net() -> nn.Module:
    layers, c_in = [], 3
    for c_out in (64, 64, 128, 128, 256, 256, 256, 256):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))


def llama() -> nn.Module:
    return CharLlama(vocab_size=128, hidden_size=256, num_layers=12, num_heads=4, intermediate_size=768)


OPTIMIZERS = {
    "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, fused=True),
    "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=True),
    "torch AdamW (single)": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=1e-2, foreach=False),
    "ours AdamP (default)": lambda p: AdamP(p, lr=1e-3, weight_decay=1e-2),
    "ours AdamP (fused)": lambda p: AdamP(p, lr=1e-3, weight_decay=1e-2, fused=True),
    "ours AdamP (foreach)": lambda p: AdamP(p, lr=1e-3, weight_decay=1e-2, foreach=True),
    "ours AdamP (single)": lambda p: AdamP(p, lr=1e-3, weight_decay=1e-2, foreach=False),
    "adamp.AdamP 0.3.0": lambda p: adamp_ref.AdamP(p, lr=1e-3, weight_decay=1e-2),
    "pytorch_optimizer.AdamP": lambda p: pytorch_optimizer.AdamP(p, lr=1e-3, weight_decay=1e-2),
    "ours SGDP (default)": lambda p: SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-5),
    "ours SGDP (fused)": lambda p: SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-5, fused=True),
    "ours SGDP (foreach)": lambda p: SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-5, foreach=True),
    "ours SGDP (single)": lambda p: SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-5, foreach=False),
    "adamp.SGDP 0.3.0": lambda p: adamp_ref.SGDP(p, lr=0.1, momentum=0.9, weight_decay=1e-5),
    "ours FAdam (default)": lambda p: FAdam(p, lr=1e-3),
    "ours FAdam (fused)": lambda p: FAdam(p, lr=1e-3, fused=True),
    "ours FAdam (foreach)": lambda p: FAdam(p, lr=1e-3, foreach=True),
    "ours FAdam (single)": lambda p: FAdam(p, lr=1e-3, foreach=False),
    "pytorch_optimizer.FAdam": lambda p: pytorch_optimizer.FAdam(p, lr=1e-3),
}


#: (ours with default arguments, the references it replaces)
DEFAULT_VS_REFERENCE = {"ours AdamP (default)": ("adamp.AdamP 0.3.0", "pytorch_optimizer.AdamP"),
                        "ours SGDP (default)": ("adamp.SGDP 0.3.0",),
                        "ours FAdam (default)": ("pytorch_optimizer.FAdam",)}


def small_tensors() -> nn.Module:
    return nn.ParameterList([nn.Parameter(torch.randn(64, 64)) for _ in range(200)])


def cases_for(model_fn) -> tuple[dict, int, int]:
    torch.manual_seed(0)
    template = [p.detach() for p in model_fn().parameters()]
    grads = [torch.randn_like(p) * 1e-2 for p in template]
    cases = {}
    for name, make in OPTIMIZERS.items():
        params = [nn.Parameter(t.clone()) for t in template]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        cases[name] = make(params).step
    return cases, sum(t.numel() for t in template), len(template)


def main() -> None:
    args = benchmark_args(__doc__, clock=True)
    timer = time.process_time if args.clock == "cpu" else time.perf_counter
    speedups = {}
    sets = (("conv net with BatchNorm", conv_bn_net), ("Llama", llama), ("200 x (64, 64)", small_tensors))
    for label, fn in sets:
        cases, n, tensors = cases_for(fn)
        results = {r.name: r.median_s for r in compare(
            cases, baseline="torch AdamW (fused)", repeats=args.repeats, timer=timer,
            title=f"optimizer step, {label}: {n / 1e6:.2f} M parameters in {tensors} tensors, "
                  f"{torch.get_num_threads()} threads, {args.clock} clock")}
        for ours, references in DEFAULT_VS_REFERENCE.items():
            for ref in references:
                speedups[(ours, ref, label)] = results[ref] / results[ours]
        print()
    print("Speed-up of ours with default arguments over each reference (reference time / ours; goal >= 3):\n")
    print("| ours (default) | reference | " + " | ".join(label for label, _ in sets) + " |")
    print("|---|---|" + "---|" * len(sets))
    for ours, references in DEFAULT_VS_REFERENCE.items():
        for ref in references:
            print(f"| {ours} | {ref} | " + " | ".join(f"{speedups[(ours, ref, label)]:.1f}x" for label, _ in sets)
                  + " |")


if __name__ == "__main__":
    main()
