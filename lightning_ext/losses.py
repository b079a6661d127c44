"""The per-sample loss contract (docs/architecture.md) and its helpers.

A ``training_step`` that wants loss-based techniques (sample reweighting, distillation)
returns a dict::

    {"loss": scalar,                  # what plain training would minimise
     "per_sample_loss": [B] tensor,   # unreduced, carries grad
     "num_tokens": [B] tensor,        # optional: tokens behind each per-sample loss
     "logits": tensor}                # optional: for distillation

:func:`per_sample_cross_entropy` computes the two middle entries from logits and labels, and
:func:`token_mean` gives back the scalar loss that the usual token-mean cross-entropy would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

PER_SAMPLE_KEYS = ("loss", "per_sample_loss", "num_tokens", "logits")


def per_sample_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                             shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of each sample over its non-ignored positions, and their counts.

    Args:
        logits: ``[B, C]`` (classification) or ``[B, T, C]`` (sequences).
        labels: ``[B]`` or ``[B, T]`` class ids; ``ignore_index`` marks positions without a target.
        shift: for causal LMs whose labels equal the inputs: predict position ``t + 1`` from ``t``.

    Returns:
        ``(per_sample_loss, num_tokens)``, both ``[B]``; float32 (or float64 for float64 logits)
        under any autocast precision. A sample with no target gets loss 0 and count 0.
    """
    if logits.dim() == labels.dim() + 1 == 2:  # classification: one target per sample
        logits, labels = logits.unsqueeze(1), labels.unsqueeze(1)
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"expected logits [B, T, C] with labels [B, T] (or [B, C] with [B]); "
                         f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    token_loss = F.cross_entropy(logits.to(dtype).transpose(1, 2), labels, ignore_index=ignore_index,
                                 reduction="none")
    num_tokens = (labels != ignore_index).sum(dim=1)
    per_sample = token_loss.sum(dim=1) / num_tokens.clamp_min(1).to(dtype)
    return per_sample, num_tokens


def token_mean(per_sample_loss: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
    """The batch's token-mean loss (what ``F.cross_entropy(..., reduction="mean")`` gives)."""
    weights = num_tokens.to(per_sample_loss.dtype)
    return (per_sample_loss * weights).sum() / weights.sum().clamp_min(1)


def require_keys(output: Any, keys: tuple[str, ...], technique: str) -> Mapping[str, Any]:
    """Check a ``training_step`` output for the contract keys a technique needs; fail clearly."""
    if not isinstance(output, Mapping):
        raise TypeError(
            f"{technique} needs training_step to return a dict with {list(keys)}, got {type(output).__name__}. "
            "Compute per-sample losses with lightning_ext.losses.per_sample_cross_entropy(logits, labels) and "
            "return {'loss': ..., 'per_sample_loss': ...}.")
    missing = [k for k in keys if k not in output]
    if missing:
        raise KeyError(
            f"{technique} needs training_step's output to contain {missing}; it has {sorted(output)}. "
            "Compute per-sample losses with lightning_ext.losses.per_sample_cross_entropy(logits, labels).")
    return output
