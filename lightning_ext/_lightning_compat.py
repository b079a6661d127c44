"""The checkpoint path a ``fit``/``validate``/... call will restore, known already in ``setup``.

Techniques that change the model's structure must rebuild the checkpoint's structure in
``setup`` (before Lightning loads the weights), so they need the checkpoint path there. In
Lightning 2.6 ``trainer.ckpt_path`` is only set when the restore starts, *after* ``setup``;
the resolved path (``"last"``, ``"hpc"`` and registry aliases already resolved) exists only as
a local variable of ``Trainer._run``. We record it by wrapping
``_CheckpointConnector._select_ckpt_path`` (the one place that resolves it) once, at import.
This touches a Lightning internal — hence ``lightning`` pinned to its minor version and
``tests/test_manifest.py`` exercising it.
"""

from __future__ import annotations

import functools

import lightning.pytorch as pl
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector

_ATTR = "_lightning_ext_selected_ckpt_path"


def _install() -> None:
    original = _CheckpointConnector._select_ckpt_path
    if getattr(original, "_lightning_ext_wrapped", False):
        return

    @functools.wraps(original)
    def select_and_record(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        setattr(self.trainer, _ATTR, path)
        return path

    select_and_record._lightning_ext_wrapped = True
    _CheckpointConnector._select_ckpt_path = select_and_record


def pending_ckpt_path(trainer: pl.Trainer):
    """The checkpoint the current run restores from (``None`` for a fresh run)."""
    return trainer.ckpt_path if trainer.ckpt_path is not None else getattr(trainer, _ATTR, None)


_install()
