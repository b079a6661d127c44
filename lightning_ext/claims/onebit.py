"""OneBit's claim, reproduced (Xu et al., NeurIPS 2024): 1-bit weights (sign + two value vectors) recover most of
the full-precision quality after a short distillation, where naive 1-bit conversion collapses.

    python -m lightning_ext.claims.onebit [--seed 0] [--teacher-steps 800] [--student-steps 400]

Data: next-character prediction over the standard library's source (16 characters of context). Teacher (spec
qat.md §7.5): a *non-residual* ``CharContextMLP`` — Embedding(128, 32) x 16 -> FP Linear(512 -> 256) -> 4 x
[Linear(256 -> 256) + GELU] -> FP head — trained in full precision. Students: the 4 hidden linears become
``OneBitLinear``; embedding, input layer and head stay full precision and frozen. Distillation through
``lightning_ext.nn.onebit.distillation_loss`` (per-token KL + hidden-state MSE on the 4 block outputs, weight 1),
AdamW betas (0.9, 0.98), lr 2e-3. Reported: validation bits per character and next-character accuracy on 50k
held-out positions, and the share of the teacher's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from lightning_ext.claims.quest import train_sampled  # the same sampled-batch AdamW loop
from lightning_ext.data.stdlib_chars import stdlib_context_windows
from lightning_ext.models import CharContextMLP
from lightning_ext.nn.onebit import OneBitLinear, distillation_loss

HIDDEN = [f"blocks.{i}.fc" for i in range(4)]


def evaluate(model, xv, yv) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(xv[i:i + 4096]) for i in range(0, xv.shape[0], 4096)])
    model.train()
    return float(F.cross_entropy(logits, yv)) / math.log(2), float((logits.argmax(1) == yv).float().mean())


def train_teacher(data, seed: int, steps: int, batch: int = 128, lr: float = 2e-3) -> CharContextMLP:
    (xt, yt), _ = data
    torch.manual_seed(seed)
    model = CharContextMLP(width=256, depth=4, residual=False)
    train_sampled(model, xt, yt, steps, seed, batch, lr)
    return model.eval()


def one_bit_student(teacher, init: str, layer_norm: bool = True) -> CharContextMLP:
    student = copy.deepcopy(teacher).train()
    for name in HIDDEN:
        block = student.get_submodule(name.rsplit(".", 1)[0])
        block.fc = OneBitLinear.from_linear(block.fc, init=init, layer_norm=layer_norm)
    for module in (student.embed, student.proj_in, student.head):
        module.requires_grad_(False)
    return student


def distill(student, teacher, data, seed: int, steps: int, batch: int = 128, lr: float = 2e-3) -> None:
    (xt, _), _ = data
    hidden_s, hidden_t = [], []
    for model, store in ((student, hidden_s), (teacher, hidden_t)):
        for block in model.blocks:
            block.register_forward_hook(lambda _m, _i, out, store=store: store.append(out))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(steps):
        idx = torch.randint(0, xt.shape[0], (batch,), generator=g)
        hidden_s.clear(), hidden_t.clear()
        with torch.no_grad():
            t_logits = teacher(xt[idx])
        loss = distillation_loss(student(xt[idx]), t_logits, hidden_s, hidden_t)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    hidden_s.clear(), hidden_t.clear()


def run(seed: int = 0, teacher_steps: int = 800, student_steps: int = 400) -> dict[str, tuple[float, float]]:
    (xt, yt), (xv, yv) = stdlib_context_windows()
    pick = torch.randperm(xv.shape[0], generator=torch.Generator().manual_seed(0))[:50_000]
    data = ((xt, yt), (xv[pick], yv[pick]))
    teacher = train_teacher(data, seed, teacher_steps)
    rows = {"FP32 teacher": evaluate(teacher, *data[1]),
            "naive 1-bit PTQ, sign(W) * row-mean|W|": evaluate(one_bit_student(teacher, "naive", False), *data[1]),
            "SVID init, no training": evaluate(one_bit_student(teacher, "svd"), *data[1])}
    student = one_bit_student(teacher, "svd")
    distill(student, teacher, data, seed, student_steps)
    rows[f"OneBit QAT+KD, SVID init, {student_steps} steps"] = evaluate(student, *data[1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--student-steps", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    rows = run(args.seed, args.teacher_steps, args.student_steps)
    fp_acc = rows["FP32 teacher"][1]
    print("| model | val bpc | next-char acc | % of FP acc |\n|---|---|---|---|")
    for name, (bpc, acc) in rows.items():
        print(f"| {name} | {bpc:.3f} | {acc:.4f} | {100 * acc / fp_acc:.1f} |")
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
