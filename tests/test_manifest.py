"""The technique manifest in checkpoints, and the resume guard built on it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.data import DigitsDataModule
from lightning_ext.manifest import MANIFEST_KEY, read_manifest, techniques_from_checkpoint
from lightning_ext.models import MLPClassifier
from toy_techniques import Gate


def _fit(root, callbacks, max_steps, ckpt_path=None):
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(MLPClassifier(hidden=[16]), datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture
def gated_ckpt(tmp_path):
    trainer = _fit(tmp_path, [Gate(target_modules=["net.0"], init=0.5)], 3)
    path = tmp_path / "gated.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_init_args_are_captured_with_defaults():
    assert Gate().init_args == {"target_modules": None, "init": 1.0}
    assert Gate(["net.2"], init=2.0).init_args == {"target_modules": ["net.2"], "init": 2.0}


def test_checkpoint_carries_the_manifest(gated_ckpt):
    ckpt = torch.load(gated_ckpt, weights_only=False)
    assert "net.0.gate" in ckpt["state_dict"]
    assert ckpt[MANIFEST_KEY]["techniques"] == [
        {"name": "Gate", "class_path": "toy_techniques.Gate", "init_args": {"target_modules": ["net.0"],
                                                                              "init": 0.5}}]
    assert read_manifest(gated_ckpt) == ckpt[MANIFEST_KEY]["techniques"]


def test_resume_without_the_technique_is_refused_by_name(gated_ckpt, tmp_path):
    from lightning_ext.callbacks import Technique

    class Other(Technique):
        pass

    with pytest.raises(RuntimeError, match=r"\['Gate'\].*techniques_from_checkpoint"):
        _fit(tmp_path, [Other()], 5, ckpt_path=str(gated_ckpt))


def test_resume_with_other_arguments_is_refused(gated_ckpt, tmp_path):
    with pytest.raises(RuntimeError, match=r"Gate: checkpoint .*0\.5.* vs trainer .*0\.25"):
        _fit(tmp_path, [Gate(target_modules=["net.0"], init=0.25)], 5, ckpt_path=str(gated_ckpt))


def test_techniques_from_checkpoint_rebuild_and_resume(gated_ckpt, tmp_path):
    callbacks = techniques_from_checkpoint(gated_ckpt)
    assert [type(c) for c in callbacks] == [Gate] and callbacks[0].init_args["init"] == 0.5
    trainer = _fit(tmp_path, callbacks, 5, ckpt_path=str(gated_ckpt))
    assert trainer.global_step == 5
    # the gate parameter came from the checkpoint and kept training (it started at 0.5)
    assert not torch.equal(trainer.lightning_module.net[0].gate, torch.full((16,), 0.5))
