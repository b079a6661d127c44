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


# -- two-way manifest, optimizer stack, weights-only fine-tune (each failed on main before: a checkpoint without a
# technique loaded silently into a trainer with one; an AdamP checkpoint resumed with SGDP died with KeyError)


def test_a_plain_checkpoint_refuses_a_trainer_that_adds_a_technique(tmp_path):
    plain = tmp_path / "plain.ckpt"
    _fit(tmp_path / "a", [], 3).save_checkpoint(plain)
    with pytest.raises(RuntimeError, match=r"plain Lightning checkpoint, no manifest\); this trainer adds \['Gate'\]"
                                           r".*LoadWeights"):
        _fit(tmp_path / "b", [Gate(target_modules=["net.0"])], 5, ckpt_path=str(plain))
    recorded = tmp_path / "recorded.ckpt"  # saved with a Manifest (as the CLI's runs are): "without any technique"
    from lightning_ext.callbacks import Manifest

    _fit(tmp_path / "c", [Manifest()], 3).save_checkpoint(recorded)
    with pytest.raises(RuntimeError, match=r"trained without any technique; this trainer adds \['Gate'\]"):
        _fit(tmp_path / "d", [Gate(target_modules=["net.0"])], 5, ckpt_path=str(recorded))


def test_a_checkpoint_refuses_a_trainer_with_one_technique_more(gated_ckpt, tmp_path):
    with pytest.raises(RuntimeError, match=r"with techniques \['Gate'\] only; this trainer adds \[.Counted"):
        _fit(tmp_path, [Gate(target_modules=["net.0"], init=0.5), Counted()], 5, ckpt_path=str(gated_ckpt))


class _WithOptimizer(MLPClassifier):
    def __init__(self, optimizer: str = "AdamP") -> None:
        super().__init__(hidden=[16])
        self.optimizer_name = optimizer

    def configure_optimizers(self):
        from lightning_ext import optimizers

        return getattr(optimizers, self.optimizer_name)(self.parameters(), lr=1e-2)


def _fit_with(root, optimizer, callbacks, max_steps, ckpt_path=None):
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                         limit_val_batches=0, callbacks=callbacks)
    trainer.fit(_WithOptimizer(optimizer), datamodule=DigitsDataModule(), ckpt_path=ckpt_path)
    return trainer


def test_the_optimizer_stack_is_recorded_and_another_optimizer_is_refused_before_its_state_loads(tmp_path):
    from lightning_ext.callbacks import LAWN, Manifest

    adamp = tmp_path / "adamp.ckpt"
    _fit_with(tmp_path / "a", "AdamP", [Manifest()], 3).save_checkpoint(adamp)
    assert torch.load(adamp, weights_only=False)[MANIFEST_KEY]["optimizers"] == [["lightning_ext.optimizers.AdamP"]]
    with pytest.raises(RuntimeError, match=r"trained with optimizer lightning_ext\.optimizers\.AdamP; this trainer "
                                           r"has lightning_ext\.optimizers\.SGDP.*LoadWeights"):
        _fit_with(tmp_path / "b", "SGDP", [Manifest()], 5, ckpt_path=str(adamp))
    # a technique adds the Manifest itself, and a wrapper is part of the stack
    lawn = tmp_path / "lawn.ckpt"
    _fit_with(tmp_path / "c", "AdamP", [LAWN(free_steps=1)], 3).save_checkpoint(lawn)
    assert torch.load(lawn, weights_only=False)[MANIFEST_KEY]["optimizers"] == [
        ["lightning_ext.optimizers.LAWN", "lightning_ext.optimizers.AdamP"]]
    assert _fit_with(tmp_path / "d", "AdamP", [LAWN(free_steps=1)], 5, ckpt_path=str(lawn)).global_step == 5


def test_load_weights_starts_a_new_run_from_the_weights_with_another_stack(tmp_path):
    from lightning_ext.callbacks import LoadWeights, Manifest

    adamp = tmp_path / "adamp.ckpt"
    trained = _fit_with(tmp_path / "a", "AdamP", [Manifest()], 3)
    trained.save_checkpoint(adamp)
    weights = {k: v.clone() for k, v in trained.lightning_module.state_dict().items()}
    # a technique listed before LoadWeights still gets the loaded weights before its surgery
    started = _fit_with(tmp_path / "b", "SGDP", [Gate(target_modules=["net.0"], init=0.5), LoadWeights(adamp)], 0)
    state = started.lightning_module.state_dict()  # Gate wrapped net.0 after the load: net.0.inner.*
    renamed = {k.replace("net.0.", "net.0.inner."): v for k, v in weights.items()}
    assert started.global_step == 0 and all(torch.equal(state[k], v) for k, v in renamed.items())
    assert _fit_with(tmp_path / "c", "SGDP", [LoadWeights(adamp)], 2).global_step == 2  # a fresh SGDP run
    gated = tmp_path / "gated.ckpt"
    _fit(tmp_path / "d", [Gate(target_modules=["net.0"])], 1).save_checkpoint(gated)
    with pytest.raises(RuntimeError, match=r"unexpected \['net\.0\.gate', .*techniques \['Gate'\].*strict=False"):
        _fit(tmp_path / "e", [LoadWeights(gated)], 1)
    with pytest.raises(ValueError, match="ckpt_path must be a non-empty string"):
        LoadWeights("")


def test_the_cli_records_the_optimizer_and_refuses_sgdp_on_an_adamp_checkpoint(tmp_path):
    """The issue's case through the command line: an AdamP run's checkpoint resumed with configs/optimizers/sgdp.yaml
    (same model) stopped at its first step with a bare KeyError: 'momentum'."""
    from cli_utils import ROOT, run_cli

    common = ["--trainer.max_steps", "2", "--trainer.logger", "false", "--trainer.limit_val_batches", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)]
    done = run_cli(["fit", "--config", str(ROOT / "configs/optimizers/adamp.yaml"), *common], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    refused = run_cli(["fit", "--config", str(ROOT / "configs/optimizers/sgdp.yaml"), *common,
                       "--trainer.max_steps", "4", "--ckpt_path", str(ckpt)], tmp_path)
    assert refused.returncode != 0 and "KeyError" not in refused.stderr
    assert "trained with optimizer lightning_ext.optimizers.AdamP" in refused.stderr, refused.stderr[-2000:]
