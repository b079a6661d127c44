"""Optimizer-step time under DeepSpeed ZeRO-2 with 2 processes on CPU (gloo), against torch AdamW under the same
ZeRO-2 and against each optimizer under DDP (goal: every optimizer of the suite <= 1.5x AdamW under ZeRO-2).

    python -m benchmarks.zero [--repeats 15] [--quick] [--clock {wall,cpu}]

Two processes (one thread each) train the same 8-layer MLP (width 512, 2.1 M parameters, LayerNorm after each
hidden Linear, so AdamP/SGDP's projection applies). Each optimizer gets its own DeepSpeed engine (ZeRO-2: every
rank steps its flat fp32 half of the model, the per-tensor statistics reduced across the ranks) and its own DDP
model (every rank steps the full tensors). Only the optimizer step is timed — ``engine.step()`` (the sharded step,
then DeepSpeed's all-gather of the updated weights) and ``optimizer.step()`` under DDP; forward and backward run
before each step, outside the clock. The timer is that step-only clock, and the runner's interleaved schedule runs
the same calls in the same order on both ranks (the collectives must match); rank 0 prints the table.
``--clock cpu`` times the steps by the process's CPU time instead of the wall clock: on a shared 2-core machine
the wall clock also counts the time a rank is descheduled (IQRs of 16-88 % were seen); the CPU time counts each
collective's work but not its wait.

CrAM(AdamW)'s step includes its second forward/backward in both columns: under ZeRO-2 the pass-2 gradient, taken
outside the engine's hooks, plus its two all-reduces and the engine step
(:func:`lightning_ext.optimizers.cram_deepspeed.second_pass`); under DDP the optimizer's closure. Its fair ratio is
the one against its own DDP step.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

WIDTH, DEPTH, BATCH = 512, 8, 64
OPTIMIZERS = ("AdamW", "AdamP", "SGDP", "FAdam", "LAWN(AdamW)", "CrAM(AdamW)")


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, d = [], 64
    for _ in range(DEPTH):
        layers += [nn.Linear(d, WIDTH, bias=False), nn.LayerNorm(WIDTH), nn.ReLU()]
        d = WIDTH
    return nn.Sequential(*layers, nn.Linear(d, 10))


def _optimizer(name: str, model):
    import torch

    from lightning_ext import optimizers as ours

    params = list(model.parameters())
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    if name == "AdamP":
        return ours.AdamP(params, lr=1e-3, weight_decay=1e-2)
    if name == "SGDP":
        return ours.SGDP(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    if name == "FAdam":
        return ours.FAdam(params, lr=1e-3)
    if name == "LAWN(AdamW)":  # every hidden weight constrained, past the free phase
        matrices = [p for p in params if p.dim() == 2]
        return ours.LAWN(torch.optim.AdamW(params, lr=1e-3), matrices, free_steps=0)
    if name == "CrAM(AdamW)":
        return ours.CrAM(torch.optim.AdamW(params, lr=1e-3), model, rho=0.05, sparsities=[0.5])
    raise ValueError(name)


class _StepClock:
    """Seconds spent inside optimizer steps (the runner's timer): wall-clock, or the process's CPU time
    (``--clock cpu``)."""

    def __init__(self, cpu: bool = False) -> None:
        self.total = 0.0
        self.now = time.process_time if cpu else time.perf_counter

    def __call__(self) -> float:
        return self.total

    def time(self, fn) -> None:
        start = self.now()
        fn()
        self.total += self.now() - start


def _batch(step: int):
    import torch

    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 64, generator=g), torch.randint(0, 10, (BATCH,), generator=g)


def _zero2_case(name: str, clock: _StepClock):
    import deepspeed
    import torch

    model = _model()
    config = {"train_micro_batch_size_per_gpu": BATCH, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    optimizer = _optimizer(name, model)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    step = [0]
    if name.startswith("CrAM"):
        from lightning_ext.optimizers import cram_deepspeed

        optimizer.driven = True  # its second pass comes from cram_deepspeed.second_pass, not a closure

    def run() -> None:
        x, y = _batch(step[0])
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        if name.startswith("CrAM"):
            def pass_two(params, grads) -> None:
                with torch.enable_grad():
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                    for view, grad in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                        if grad is not None:
                            view.add_(grad)

            clock.time(lambda: (cram_deepspeed.second_pass(optimizer, engine.optimizer, pass_two), engine.step()))
        else:
            clock.time(engine.step)
        step[0] += 1

    return run


def _ddp_case(name: str, clock: _StepClock):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    module = _model()
    model = DistributedDataParallel(module)
    optimizer = _optimizer(name, module)
    step = [0]

    def run() -> None:
        x, y = _batch(step[0])
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        if name.startswith("CrAM"):  # CrAM's second pass is part of its step: forward + backward in the closure
            def closure():
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss
            clock.time(lambda: optimizer.step(closure))
        else:
            clock.time(optimizer.step)
        step[0] += 1

    return run


def _worker(rank: int, world: int, port: int, repeats: int, clock_kind: str) -> None:
    import logging

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from benchmarks.runner import compare, format_table

    clock = _StepClock(cpu=clock_kind == "cpu")
    cases = {f"{n} ZeRO-2": _zero2_case(n, clock) for n in OPTIMIZERS}
    cases.update({f"{n} DDP": _ddp_case(n, clock) for n in OPTIMIZERS})
    params = sum(p.numel() for p in _model().parameters())
    results = compare(cases, baseline="AdamW ZeRO-2", repeats=repeats, warmup=3, number=4, timer=clock,
                      print_table=False)
    if rank == 0:
        title = (f"optimizer step, {world} processes x 1 thread, MLP {DEPTH} x {WIDTH} ({params / 1e6:.1f} M "
                 f"parameters), DeepSpeed ZeRO-2 on CPU vs DDP, {clock_kind} clock")
        print(format_table(results, "AdamW ZeRO-2", title=title, repeats=repeats, number=4))
        by = {r.name: r for r in results}
        print("\n| optimizer | ZeRO-2 / AdamW ZeRO-2 | ZeRO-2 / own DDP |\n|---|---|---|")
        for n in OPTIMIZERS:
            z, d = by[f"{n} ZeRO-2"], by[f"{n} DDP"]
            print(f"| {n} | {z.ratio:.2f} | {z.median_s / d.median_s:.2f} |")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    from benchmarks.runner import benchmark_args

    args = benchmark_args(__doc__, clock=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, args.repeats, args.clock), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
