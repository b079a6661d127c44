"""A small context-window character MLP (plain ``nn.Module``) for the quantization demos.

``Embedding(128, emb) x context -> Linear(context*emb -> width)`` (``proj_in``), then ``depth`` blocks, then
``head``. ``residual=True``: pre-norm residual MLP blocks ``x + fc2(gelu(fc1(rmsnorm(x))))`` (QuEST's demo,
spec qat.md §7.3); ``residual=False``: a plain stack ``gelu(fc(x))`` so every hidden layer is on the critical
path (OneBit's demo, §7.5). Hidden linears are named ``blocks.<i>.fc1/fc2`` or ``blocks.<i>.fc``.
"""

from __future__ import annotations

import torch
from torch import nn


class _ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class _PlainBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.fc(x))


class CharContextMLP(nn.Module):
    """Predicts the next character from the previous ``context`` characters (ids ``[B, context]`` -> logits)."""

    def __init__(self, vocab_size: int = 128, context: int = 16, emb: int = 32, width: int = 256,
                 hidden: int = 512, depth: int = 2, residual: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb)
        self.proj_in = nn.Linear(context * emb, width)
        self.blocks = nn.ModuleList(_ResidualBlock(width, hidden) if residual else _PlainBlock(width)
                                    for _ in range(depth))
        self.norm = nn.RMSNorm(width) if residual else nn.Identity()
        self.head = nn.Linear(width, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(self.embed(ids).flatten(1))
        if not isinstance(self.norm, nn.Identity):
            h = nn.functional.gelu(h)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
