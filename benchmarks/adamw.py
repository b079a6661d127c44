"""torch's own AdamW (fused / foreach / single-tensor): the baseline every optimizer is measured against.

    python -m benchmarks.adamw

Optimizer step only (gradients are fixed random tensors), on a Llama-style LM from the demo
(``lightning_ext.models.CharLlama``) sized like the anchor model of the optimizer issue.
"""

from __future__ import annotations

import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.models import CharLlama


def llama_parameters(hidden: int = 384, layers: int = 6, intermediate: int = 1536) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    model = CharLlama(vocab_size=128, hidden_size=hidden, num_layers=layers, num_heads=6,
                      intermediate_size=intermediate)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


def main() -> None:
    args = benchmark_args(__doc__)
    cases = {}
    for mode in ("fused", "foreach", "single"):
        params = [torch.nn.Parameter(p.detach().clone()) for p in llama_parameters()]
        for p, q in zip(params, llama_parameters()):
            p.grad = q.grad
        flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[mode]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, **flags)
        cases[f"torch AdamW ({mode})"] = opt.step
    n = sum(p.numel() for p in params)
    compare(cases, baseline="torch AdamW (fused)", repeats=args.repeats,
            title=f"AdamW step, Llama {n / 1e6:.1f} M parameters in {len(params)} tensors, "
                  f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
