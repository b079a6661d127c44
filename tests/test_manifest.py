"""The technique manifest in checkpoints, and the resume guard built on it."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.data import DigitsDataModule
from lightning_ext.manifest import MANIFEST_KEY, read_manifest, techniques_from_checkpoint
from lightning_ext.models import MLPClassifier
from toy_techniques import Counted, Gate


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
        {"name": "Gate", "state_key": "Gate", "class_path": "toy_techniques.Gate", "init_args": {"target_modules": ["net.0"],
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


def test_class_paths_are_public_import_paths():
    """The manifest names a technique by the path users import it from, not its defining module, so a file
    that moves keeps old checkpoints loadable; a class path whose module is gone resolves by name."""
    import lightning_ext.callbacks as callbacks
    from lightning_ext.manifest import public_class_path

    for name in callbacks.__all__:
        assert public_class_path(getattr(callbacks, name)) == f"lightning_ext.callbacks.{name}"
    assert public_class_path(Gate) == "toy_techniques.Gate"


def test_a_class_path_whose_module_moved_resolves_by_public_name(tmp_path):
    from lightning_ext.callbacks import LossReweighting

    path = tmp_path / "old.ckpt"
    torch.save({MANIFEST_KEY: {"techniques": [
        {"name": "LossReweighting", "class_path": "lightning_ext.callbacks.moved_away.LossReweighting",
         "init_args": {"strategy": "extremes", "r": 0.5, "delta": 1.0, "warmup_steps": 0, "warmup_r": None,
                       "log_diagnostics": True}}]}}, path)
    (callback,) = techniques_from_checkpoint(path)
    assert type(callback) is LossReweighting and callback.init_args["strategy"] == "extremes"


def test_two_instances_keep_their_own_state_and_data_arguments_stay_out(tmp_path):
    """``state_key`` includes the identity arguments: two instances live in one Trainer, each resumes its own
    state; a data argument (``non_config_args``) is not in the manifest and may differ on resume."""
    first, second = Counted("a", notes=object()), Counted("b", notes=object())
    assert first.state_key != second.state_key
    trainer = _fit(tmp_path, [first, second], 3)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    assert {e["state_key"] for e in ckpt[MANIFEST_KEY]["techniques"]} == {first.state_key, second.state_key}
    assert all("notes" not in e["init_args"] for e in ckpt[MANIFEST_KEY]["techniques"])
    a, b = Counted("a", notes=object()), Counted("b")
    b.state["batches"] = 100  # must be replaced by the saved 3
    _fit(tmp_path, [a, b], 5, ckpt_path=str(path))
    assert a.state["batches"] == b.state["batches"] == 5


def test_checkpoints_from_before_state_keys_still_resume(tmp_path):
    """Written before instance-specific state keys: state under the class name, manifest without
    ``state_key``. The state still loads and the manifest check still compares (by name)."""
    trainer = _fit(tmp_path, [Counted("a")], 3)
    path = tmp_path / "new.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["callbacks"]["Counted"] = ckpt["callbacks"].pop(Counted("a").state_key)
    for entry in ckpt[MANIFEST_KEY]["techniques"]:
        del entry["state_key"]
    legacy = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy)
    resumed = Counted("a")
    _fit(tmp_path, [resumed], 5, ckpt_path=str(legacy))
    assert resumed.state["batches"] == 5
    with pytest.raises(RuntimeError, match=r"\['Counted'\].*techniques_from_checkpoint"):
        _fit(tmp_path, [Gate()], 5, ckpt_path=str(legacy))


def _bad_checkpoints(good, root):
    """An empty file, the first half of a real checkpoint (an interrupted save), and a YAML file."""
    data = good.read_bytes()
    files = {"empty": (b"", r"is empty \(0 bytes\)"),
             "truncated": (data[:len(data) // 2], r"is truncated: a zip archive of \d+ bytes without its end"),
             "yaml": (b"model:\n  lr: 0.1\n", r"is not a torch checkpoint: a 17-byte file starting with b'mode'")}
    for name, (content, message) in files.items():
        path = root / f"{name}.ckpt"
        path.write_bytes(content)
        yield path, message


def test_bad_checkpoint_files_are_refused_naming_the_file_and_the_cause(gated_ckpt, tmp_path):
    """Before: an empty file raised a bare ``EOFError``/``RuntimeError: mmap can only be used ...``, a truncated
    one miniz's "failed finding central directory", naming neither the file nor the cause."""
    from lightning_ext.manifest import CheckpointFileError

    for path, message in _bad_checkpoints(gated_ckpt, tmp_path):
        with pytest.raises(CheckpointFileError, match=f"^checkpoint {path} {message}"):
            read_manifest(path)
        with pytest.raises(CheckpointFileError, match=f"^checkpoint {path} {message}"):  # at setup, before loading
            _fit(tmp_path / "resumed", [Gate(target_modules=["net.0"], init=0.5)], 5, ckpt_path=str(path))
