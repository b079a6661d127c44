"""CLNP's overhead on a training step (goal: <= 5 %).

    python -m benchmarks.clnp [--repeats 15] [--device cuda]

``ContinualMLP`` forward + backward + optimizer step on task 2 of a sequence (tasks 0 and 1 already own
and froze a quarter of the neurons each), plain vs. with CLNP's layers (frozen rows restored in place,
their gradient rows not computed) and its activity-L1 penalty — through the callback's own
``training_step`` wrapper; "CLNP without penalty" (``l1=0``) separates the two costs. Sizes: the
verification MLP (64-128-128, batch 32: per-call Python/dispatch cost dominates), a wider one
(64-1024-1024, batch 256) and on CUDA also 64-4096-4096, batch 4096; each with ``torch.optim.Adam`` in its
default CPU form (single-tensor) and ``fused=True``. On the single-tensor form the frozen rows'
exact-zero gradients leave exact-zero second moments, and ``sqrt(0)`` is several times slower than
``sqrt`` of a normal number on some x86 CPUs (AMD EPYC here): that cost is the optimizer's, and the fused
form does not have it.
"""

from __future__ import annotations

import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.callbacks import CLNP
from lightning_ext.models import ContinualMLP


def make_step(hidden: int, batch: int, clnp_l1: float | None, device: str = "cpu", fused: bool = False):
    """One training step; ``clnp_l1=None``: the plain model."""
    torch.manual_seed(0)
    model = ContinualMLP(hidden=[hidden, hidden], num_tasks=3)
    model.log = lambda *args, **kwargs: None  # outside a Trainer; Lightning's logging is not what is measured
    if clnp_l1 is not None:
        clnp = CLNP(l1=clnp_l1)
        clnp.prepare(model)
        with torch.no_grad():
            for layer in clnp.layers:
                quarter = layer.out_features // 4
                layer.alloc[:quarter], layer.alloc[quarter:2 * quarter], layer.alloc[2 * quarter:] = 0, 1, 2
                layer.freeze_rows(torch.arange(layer.out_features) < 2 * quarter)
            clnp._sync_inputs()
        clnp._current = 2
        clnp._install(model)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused or None)
    g = torch.Generator().manual_seed(0)
    batch_data = tuple(t.to(device) for t in (torch.rand(batch, 64, generator=g),
                                              torch.randint(0, 2, (batch,), generator=g), torch.full((batch,), 2)))
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def step():
        opt.zero_grad()
        model.training_step(batch_data, 0)["loss"].backward()
        opt.step()
        sync()

    return step


def main() -> None:
    args = benchmark_args(__doc__, device=True)
    sizes = [(128, 32), (1024, 256)] + ([(4096, 4096)] if torch.device(args.device).type == "cuda" else [])
    for hidden, batch in sizes:
        for fused in (False, True):
            cases = {name: make_step(hidden, batch, l1, args.device, fused)
                     for name, l1 in (("plain", None), ("CLNP (task 2 of 3)", 1e-3), ("CLNP without penalty", 0.0))}
            threads = f", {torch.get_num_threads()} threads" if args.device == "cpu" else ""
            compare(cases, baseline="plain", repeats=args.repeats,
                    title=f"training step, MLP 64-{hidden}-{hidden}, batch {batch}, "
                          f"Adam{' (fused)' if fused else ''}, {args.device}{threads}")
            print()


if __name__ == "__main__":
    main()
