"""LAWN's overhead on a training step (goal: <= 5 %).

    python -m benchmarks.lawn [--repeats 15]

The quick-start Llama (459 K parameters, batch 32 x 128 characters): forward + backward + Adam step,
with and without LAWN constraining the LM head (measured in its constrained phase).
"""

from __future__ import annotations

import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.models import CharLlama
from lightning_ext.optimizers import LAWN


def make_step(with_lawn: bool):
    torch.manual_seed(0)
    model = CharLlama(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_seq_len=128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if with_lawn:
        opt = LAWN(opt, [model.model.lm_head.weight], free_steps=0)
    ids = torch.randint(1, 128, (32, 129), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def step():
        opt.zero_grad()
        model._losses(batch)["loss"].backward()
        opt.step()

    return step


def main() -> None:
    args = benchmark_args(__doc__)
    compare({"Adam": make_step(False), "Adam + LAWN (head)": make_step(True)}, baseline="Adam",
            repeats=args.repeats, title=f"training step, quick-start Llama, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
