"""Loss reweighting's overhead on a training step (goal: <= 1 %).

    python -m benchmarks.reweighting [--repeats 15]

The quick-start Llama (459 K parameters, batch 32 x 128 characters): forward + backward + Adam step,
plain vs. with ``LossReweighting`` (LinUpper, diagnostics on) turning the per-sample losses into the
weighted loss — the callback's own code path (``_reweight``), on one process (the all-gather is a
no-op there; on N ranks it adds one gather of N floats and one of the batch sizes).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from benchmarks.runner import benchmark_args, compare
from lightning_ext.callbacks import LossReweighting
from lightning_ext.models import CharLlama


def make_step(reweight: bool):
    torch.manual_seed(0)
    model = CharLlama(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, max_seq_len=128)
    model.log = lambda *args, **kwargs: None  # outside a Trainer; Lightning's logging is not what is measured
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    callback = LossReweighting(strategy="linupper", r=0.4)
    trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=1000, strategy=None)
    ids = torch.randint(1, 128, (32, 129), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def step():
        opt.zero_grad()
        out = model._losses(batch)
        if reweight:
            out = callback._reweight(trainer, model, out)
        out["loss"].backward()
        opt.step()

    return step


def main() -> None:
    args = benchmark_args(__doc__)
    compare({"plain (mean loss)": make_step(False), "LossReweighting (linupper)": make_step(True)},
            baseline="plain (mean loss)", repeats=args.repeats,
            title=f"training step, quick-start Llama, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
