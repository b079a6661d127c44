"""CUDA-only paths (run on a lent GPU machine; skipped cleanly without CUDA)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.data import StdlibCharDataModule
from lightning_ext.models import CharLlama


@pytest.mark.gpu
def test_char_llama_learns_on_cuda_in_bf16(tmp_path):
    pl.seed_everything(0, verbose=False)
    data = StdlibCharDataModule(seq_len=128, batch_size=32, train_chars=500_000, val_chars=32_768)
    model = CharLlama(lr=3e-3)
    trainer = pl.Trainer(accelerator="cuda", devices=1, precision="bf16-mixed", max_steps=100, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=4,
                         default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    assert next(model.parameters()).device.type == "cuda"
    assert after < before - 2.0, (before, after)


@pytest.mark.gpu
def test_deepspeed_cpu_strategy_keeps_lightnings_cuda_path():
    """On a CUDA accelerator the subclass must behave as Lightning's own DeepSpeed strategy."""
    pytest.importorskip("deepspeed")
    from lightning_ext.strategies import DeepSpeedCPUStrategy

    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=DeepSpeedCPUStrategy(stage=2), logger=False)
    assert trainer.strategy.root_device.type == "cuda" and torch.cuda.is_available()


@pytest.mark.gpu
def test_cram_refuses_16_mixed_on_cuda():
    from lightning_ext.callbacks import CrAM
    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    trainer = pl.Trainer(accelerator="cuda", devices=1, precision="16-mixed", max_steps=2, logger=False,
                         enable_checkpointing=False, callbacks=[CrAM()])
    with pytest.raises(RuntimeError, match="CrAM with precision='16-mixed'"):
        trainer.fit(MLPClassifier(), datamodule=DigitsDataModule())
