"""CLNP's overhead on a training step (goal: <= 5 %).

    python -m benchmarks.clnp [--repeats 15]

``ContinualMLP`` forward + backward + Adam step on task 2 of a sequence (tasks 0 and 1 already own and
froze a quarter of the neurons each), plain vs. with CLNP's layers (allocation compare, frozen-row
select and connection mask per forward) and its activity-L1 penalty — through the callback's own
``training_step`` wrapper. Two sizes: the verification MLP (64-128-128, batch 32) and a wider one
(64-1024-1024, batch 256).
"""

from __future__ import annotations

import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.callbacks import CLNP
from lightning_ext.models import ContinualMLP


def make_step(hidden: int, batch: int, with_clnp: bool):
    torch.manual_seed(0)
    model = ContinualMLP(hidden=[hidden, hidden], num_tasks=3)
    model.log = lambda *args, **kwargs: None  # outside a Trainer; Lightning's logging is not what is measured
    if with_clnp:
        clnp = CLNP(l1=1e-3)
        clnp.prepare(model)
        with torch.no_grad():
            for layer in clnp.layers:
                quarter = layer.out_features // 4
                layer.alloc[:quarter], layer.alloc[quarter:2 * quarter], layer.alloc[2 * quarter:] = 0, 1, 2
                layer.freeze_rows(torch.arange(layer.out_features) < 2 * quarter)
            clnp._sync_inputs()
        clnp._current = 2
        clnp._install(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    batch_data = (torch.rand(batch, 64, generator=g), torch.randint(0, 2, (batch,), generator=g),
                  torch.full((batch,), 2))

    def step():
        opt.zero_grad()
        model.training_step(batch_data, 0)["loss"].backward()
        opt.step()

    return step


def main() -> None:
    args = benchmark_args(__doc__)
    for hidden, batch in ((128, 32), (1024, 256)):
        compare({"plain": make_step(hidden, batch, False), "CLNP (task 2 of 3)": make_step(hidden, batch, True)},
                baseline="plain", repeats=args.repeats,
                title=f"training step, MLP 64-{hidden}-{hidden}, batch {batch}, {torch.get_num_threads()} threads")
        print()


if __name__ == "__main__":
    main()
