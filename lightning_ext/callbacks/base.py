"""Base class of every technique callback: argument capture, manifest, state, resume checks."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import lightning.pytorch as pl

from lightning_ext.callbacks.optimizer_injection import uninject
from lightning_ext.manifest import MANIFEST_KEY, check_manifest, manifest_entry, plain_value, saved_callback_state


class Technique(pl.Callback):
    """A Lightning callback that applies one technique.

    Subclasses get, for free:

    * ``self.init_args``: the arguments their ``__init__`` was called with (defaults filled in),
      written into every checkpoint's manifest (:mod:`lightning_ext.manifest`);
    * a ``setup`` that refuses to resume from a checkpoint trained with other techniques, and adds the
      :class:`~lightning_ext.callbacks.Manifest` and the :class:`~lightning_ext.callbacks.NonFiniteGuard`
      unless the trainer has them;
    * ``state_dict``/``load_state_dict`` that save ``self.state`` (a dict of tensors and plain
      values) — put everything that must survive a resume there;
    * a ``state_key`` (the key of that state in the checkpoint, and of the manifest entry) made of the
      class name and the arguments named in ``identity_args`` — what tells two instances apart, e.g. an
      adapter's ``attr`` and ``target_modules`` — so two instances can share a Trainer and resume.

    Class attributes a subclass may set: ``technique_name`` (default: the class name), ``identity_args``,
    and ``non_config_args``: arguments that are data, not configuration (a calibration dataloader), kept out
    of the manifest and of the resume comparison.
    """

    is_lightning_ext_technique: ClassVar[bool] = True
    technique_name: ClassVar[str] = ""
    identity_args: ClassVar[tuple[str, ...]] = ()
    non_config_args: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "technique_name" not in cls.__dict__:  # each class its own name, never its base's (LoRA, not
            cls.technique_name = cls.__name__      # the shared _PeftAdapter)
        if "__init__" not in cls.__dict__:
            return
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def wrapped(self, *args: Any, **kw: Any) -> None:
            if not hasattr(self, "init_args"):  # outermost __init__ wins
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                self.init_args = {k: v for k, v in list(bound.arguments.items())[1:]}
            init(self, *args, **kw)

        cls.__init__ = wrapped

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    @property
    def state_key(self) -> str:
        identity = {k: plain_value(self.init_args[k]) for k in self.identity_args}
        return self._generate_state_key(**identity) if identity else type(self).__qualname__

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lightning_ext.callbacks.manifest import ensure_manifest, load_pending_weights
        from lightning_ext.callbacks.nonfinite import ensure_guard

        check_manifest(trainer)
        ensure_manifest(trainer)  # records the optimizer stack; checks it on resume
        ensure_guard(trainer)  # a step with a non-finite loss or gradients is skipped (on by default)
        if stage == "fit":
            load_pending_weights(trainer, pl_module)  # a LoadWeights fine-tune: before this technique's surgery

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        uninject(pl_module, self)  # an optimizer wrapping this technique injected (no-op otherwise)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # a checkpoint from before instance-specific state keys holds the state under the class name
        state = saved_callback_state(checkpoint, self)
        if state is not None:
            checkpoint["callbacks"].setdefault(self.state_key, state)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        section = checkpoint.setdefault(MANIFEST_KEY, {})
        section.setdefault("techniques", []).append(manifest_entry(self))

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)
