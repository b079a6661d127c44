"""The offline demo data and models: deterministic, contract-following, and they learn."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.data import DigitsDataModule, StdlibCharDataModule, TweetSentimentDataModule
from lightning_ext.data.stdlib_chars import decode, encode, stdlib_source_files
from lightning_ext.losses import per_sample_cross_entropy, token_mean
from lightning_ext.models import CharLlama, MLPClassifier, TextClassifier


def _trainer(**kw):
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**defaults, **kw})


def test_char_corpus_is_deterministic_and_split_by_file():
    a, b = StdlibCharDataModule(train_chars=50_000, val_chars=10_000), StdlibCharDataModule(
        train_chars=50_000, val_chars=10_000)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.ids, b.train_set.ids) and torch.equal(a.val_set.ids, b.val_set.ids)
    assert a.train_set.ids.max() < 128 and len(a.val_set) == 10_000 // 128
    item = a.train_set[3]
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    files = stdlib_source_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) and all(p.suffix == ".py" for p in files)
    assert decode(encode("def f(x):\n\treturn x")) == "def f(x):\n\treturn x"
    assert encode("é").tolist() == [0]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="seq_len"):
        StdlibCharDataModule(seq_len=0)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ValueError, match="classes"):
        DigitsDataModule(classes=[11])
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CharLlama(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="lr"):
        MLPClassifier(lr=0)


def test_char_llama_follows_the_per_sample_contract():
    torch.manual_seed(0)
    model = CharLlama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=16)
    ids = torch.randint(1, 128, (3, 17))
    out = model.training_step({"input_ids": ids[:, :-1], "labels": ids[:, 1:]}, 0)
    assert out["per_sample_loss"].shape == (3,) and out["num_tokens"].tolist() == [16] * 3
    assert out["per_sample_loss"].requires_grad and out["logits"].shape == (3, 16, 128)
    expected = torch.nn.functional.cross_entropy(out["logits"].reshape(-1, 128), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out["loss"], expected)


@pytest.mark.slow
def test_char_llama_learns_bits_per_character_fall(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = StdlibCharDataModule(seq_len=64, batch_size=16, train_chars=300_000, val_chars=16_384)
    model = CharLlama(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, max_seq_len=64, lr=3e-3)
    trainer = _trainer(max_steps=80, limit_val_batches=4, default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    assert before > 6.0  # ~log2(128) at random init
    assert after < before - 2.0, (before, after)


def test_mlp_learns_digits(tmp_path):
    pl.seed_everything(0, verbose=False)
    model, data = MLPClassifier(hidden=[64], lr=1e-2), DigitsDataModule()
    trainer = _trainer(max_epochs=4, default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/acc"]
    assert before < 0.3 and after > 0.9, (before, after)
    x, y = next(iter(data.val_dataloader()))
    ps, n = per_sample_cross_entropy(model(x), y)
    assert torch.equal(n, torch.ones_like(y)) and token_mean(ps, n) < 0.5


@pytest.mark.parametrize("name", ["CharLlama", "TextClassifier"])
def test_validate_then_fit_on_cpu(name, tmp_path):
    """Metrics reset inside trainer.validate() (inference mode) become inference tensors; the no-grad validation
    inside a following fit() must still update them, and each validation starts from a fresh state."""
    pl.seed_everything(0, verbose=False)
    if name == "CharLlama":
        data = StdlibCharDataModule(seq_len=32, batch_size=8, train_chars=20_000, val_chars=4_096)
        model, key = CharLlama(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), "val/bpc"
    else:
        data, model, key = TweetSentimentDataModule(batch_size=16, seed=0), TextClassifier(dropout=0.0), "val/loss"
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=data, verbose=False)[0][key]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0][key]
    again = trainer.validate(model, datamodule=data, verbose=False)[0][key]
    assert math.isfinite(before) and math.isfinite(after) and after != before
    assert again == after  # nothing carried over from the previous validation
