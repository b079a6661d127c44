"""Character-level language modelling on the Python standard library's own source.

The corpus is on every machine that has Python (located through ``sysconfig``), so the demo
needs no download. Files are read in sorted order and split by file into train and
validation (every ``val_every``-th file), which makes the split deterministic and keeps
validation text out of training. Characters map to 128 ids: ASCII code points as themselves,
every non-ASCII character to id 0 (NUL never occurs in source), so bits per *character* are
exactly what the loss measures.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_ext.data.resumable import ResumableDataModule

VOCAB_SIZE = 128
_SKIP_DIRS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_source_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files in sorted order, test suites and site-packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1])]
    if not files:
        raise FileNotFoundError(f"no .py files found under {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def encode(text: str) -> torch.Tensor:
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).to(torch.int64)
    return torch.where(codes < VOCAB_SIZE, codes, torch.zeros_like(codes))


def decode(ids: torch.Tensor) -> str:
    return "".join(chr(i) if i else "\ufffd" for i in ids.tolist())


class CharWindows(Dataset):
    """Non-overlapping windows of ``seq_len + 1`` ids; item = (input ids, next-char labels)."""

    def __init__(self, ids: torch.Tensor, seq_len: int) -> None:
        self.seq_len = seq_len
        n = (ids.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"corpus of {ids.numel()} characters is shorter than seq_len + 1 = {seq_len + 1}")
        self.ids = ids[: n * seq_len + 1]
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        chunk = self.ids[i * self.seq_len: (i + 1) * self.seq_len + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


class StdlibCharDataModule(ResumableDataModule):
    """Char-level LM data from the standard library's source (train/val split by file).

    Args:
        seq_len: characters per training window.
        batch_size: windows per batch (per process).
        train_chars / val_chars: how much text to read for each split (from the start of the
            sorted file list), so the demo's size does not depend on the Python version (its
            content does: it is that version's standard library).
        val_every: every ``val_every``-th file goes to validation.
        seed: shuffling seed (epoch-dependent permutation, identical on every run).
        root: a different source tree to read instead of the standard library.
    """

    def __init__(self, seq_len: int = 128, batch_size: int = 32, train_chars: int = 2_000_000,
                 val_chars: int = 131_072, val_every: int = 20, seed: int = 0, num_workers: int = 0,
                 root: str | None = None) -> None:
        super().__init__(batch_size=batch_size, seed=seed, num_workers=num_workers)
        for name, value, low in (("seq_len", seq_len, 1), ("train_chars", train_chars, 2),
                                 ("val_chars", val_chars, 2), ("val_every", val_every, 2)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.seq_len, self.train_chars, self.val_chars = seq_len, train_chars, val_chars
        self.val_every, self.root = val_every, root
        self.vocab_size = VOCAB_SIZE

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train, val, n_train, n_val = [], [], 0, 0
        for i, path in enumerate(stdlib_source_files(self.root)):
            if n_train >= self.train_chars and n_val >= self.val_chars:
                break
            text = path.read_text(encoding="utf-8", errors="replace")
            if i % self.val_every == self.val_every - 1:
                if n_val < self.val_chars:
                    val.append(text)
                    n_val += len(text)
            elif n_train < self.train_chars:
                train.append(text)
                n_train += len(text)
        self.train_set = CharWindows(encode("".join(train))[: self.train_chars], self.seq_len)
        self.val_set = CharWindows(encode("".join(val))[: self.val_chars], self.seq_len)


def stdlib_context_windows(context: int = 16, train_chars: int = 1_500_000, val_chars: int = 200_000,
                           val_every: int = 10) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                         tuple[torch.Tensor, torch.Tensor]]:
    """``((x_train, y_train), (x_val, y_val))``: every position's previous ``context`` ids and its next id, from
    the standard library's source (validation = every ``val_every``-th file), for plain-torch demos."""
    train, val, n_train, n_val = [], [], 0, 0
    for i, path in enumerate(stdlib_source_files()):
        if n_train >= train_chars and n_val >= val_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        if i % val_every == val_every - 1:
            if n_val < val_chars:
                val.append(text)
                n_val += len(text)
        elif n_train < train_chars:
            train.append(text)
            n_train += len(text)

    def windows(text: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = encode(text)[:limit]
        x = ids.unfold(0, context, 1)[:-1]
        return x, ids[context:]

    return windows("".join(train), train_chars), windows("".join(val), val_chars)
