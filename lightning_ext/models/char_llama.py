"""A tiny Llama-style causal LM built from a ``transformers`` config (no hub, random init)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric

from lightning_ext.losses import per_sample_cross_entropy, token_mean


class CharLlama(pl.LightningModule):
    """Character-level Llama for :class:`~lightning_ext.data.StdlibCharDataModule`.

    ``self.model`` is a ``transformers.LlamaForCausalLM`` (the single ``PreTrainedModel`` child
    that adapter callbacks find). ``training_step`` follows the per-sample loss contract and
    returns ``loss``, ``per_sample_loss``, ``num_tokens`` and ``logits``. Validation logs
    ``val/bpc`` (bits per character, token-weighted over the whole validation set) and
    ``val/loss``; training logs ``train/loss`` and ``train/bpc``.

    Without an ``optimizer:`` section (CLI) the module uses torch's AdamW with ``lr`` and
    ``weight_decay``, and a cosine schedule with linear warm-up over ``trainer.max_steps`` when
    ``warmup_steps > 0``.
    """

    def __init__(self, vocab_size: int = 128, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 384, max_seq_len: int = 512, lr: float = 3e-3,
                 weight_decay: float = 0.01, warmup_steps: int = 0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("num_heads", num_heads), ("intermediate_size", intermediate_size),
                            ("max_seq_len", max_seq_len)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if lr <= 0 or weight_decay < 0 or warmup_steps < 0:
            raise ValueError(f"need lr > 0, weight_decay >= 0, warmup_steps >= 0; got lr={lr}, "
                             f"weight_decay={weight_decay}, warmup_steps={warmup_steps}")
        self.save_hyperparameters()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, num_key_value_heads=num_heads,
                             intermediate_size=intermediate_size, max_position_embeddings=max_seq_len,
                             tie_word_embeddings=False, attn_implementation="sdpa")
        self.model = LlamaForCausalLM(config)
        self.val_loss = MeanMetric()
        # one sequence: the model summary counts FLOPs and shows in/out sizes from it (else a column of zeros)
        self.example_input_array = torch.zeros(1, max_seq_len, dtype=torch.long)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def _losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"])
        per_sample, num_tokens = per_sample_cross_entropy(logits, batch["labels"])
        return {"loss": token_mean(per_sample, num_tokens), "per_sample_loss": per_sample,
                "num_tokens": num_tokens, "logits": logits}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        out = self._losses(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log("train/bpc", out["loss"].detach() / math.log(2))
        return out

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._losses(batch)
        self.val_loss.update(out["per_sample_loss"], weight=out["num_tokens"])

    def on_validation_epoch_start(self) -> None:
        # reset here, not at the end: a fresh state in this loop's grad mode (states left by trainer.validate(),
        # in inference mode, are inference tensors that the no-grad validation inside fit() may not update)
        self.val_loss.reset()

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log("val/loss", loss, sync_dist=False)
        self.log("val/bpc", loss / math.log(2), prog_bar=True, sync_dist=False)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        if hp.warmup_steps == 0:
            return opt
        total = max(self.trainer.max_steps, hp.warmup_steps + 1) if self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("warmup_steps > 0 needs trainer.max_steps to set the cosine schedule's length")

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
