"""The technique manifest: which techniques a checkpoint was trained with, and their arguments.

Every technique callback (:class:`lightning_ext.callbacks.Technique`) adds one entry
``{"name", "class_path", "init_args"}`` to ``checkpoint["lightning_ext"]["techniques"]``.
Surgery (adapters, quantized layers) changes the model's structure, so the same techniques
must run in ``setup`` — before Lightning loads the weights — when a run resumes:

* :func:`check_manifest` (run by each technique's ``setup`` and by the CLI before ``fit``)
  refuses to resume when a technique of the checkpoint is missing from the trainer, or is
  present with other arguments, naming both;
* :func:`techniques_from_checkpoint` rebuilds the technique callbacks from a checkpoint, for a
  resume or an evaluation that does not have the original config at hand.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_ext._lightning_compat import pending_ckpt_path

MANIFEST_KEY = "lightning_ext"


def load_checkpoint_dict(ckpt_path: str | Path) -> dict[str, Any]:
    """The Lightning checkpoint dict (memory-mapped); for a DeepSpeed checkpoint directory, the client state
    that lives beside the shards (``{}`` if there is none)."""
    path = Path(ckpt_path)
    if path.is_dir():
        candidates = sorted(path.rglob("*model_states.pt"))
        if not candidates:
            return {}
        path = candidates[0]
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def read_manifest(ckpt_path: str | Path) -> list[dict[str, Any]]:
    """The technique entries saved in a checkpoint file (``[]`` for a plain Lightning checkpoint)."""
    return list(load_checkpoint_dict(ckpt_path).get(MANIFEST_KEY, {}).get("techniques", []))


def manifest_entry(callback: pl.Callback) -> dict[str, Any]:
    cls = type(callback)
    return {"name": getattr(callback, "technique_name", cls.__name__),
            "class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": dict(getattr(callback, "init_args", {}))}


def techniques_from_checkpoint(ckpt_path: str | Path) -> list[pl.Callback]:
    """Instantiate the technique callbacks a checkpoint was trained with (same arguments)."""
    callbacks = []
    for entry in read_manifest(ckpt_path):
        module_name, _, cls_name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        callbacks.append(cls(**entry["init_args"]))
    return callbacks


def check_manifest(trainer: pl.Trainer, ckpt_path: str | Path | None = None) -> None:
    """Refuse to resume from a checkpoint whose techniques differ from the trainer's.

    Runs once per trainer and checkpoint; ``ckpt_path`` defaults to the checkpoint the current
    run restores (known from ``setup`` on). Aliases such as ``"last"`` are skipped when given
    explicitly (the techniques' own ``setup`` checks again with the resolved path).
    """
    ckpt_path = ckpt_path if ckpt_path is not None else pending_ckpt_path(trainer)
    if ckpt_path is None or not Path(ckpt_path).exists():
        return
    if getattr(trainer, "_lightning_ext_manifest_checked", None) == str(ckpt_path):
        return
    saved = {e["name"]: e for e in read_manifest(ckpt_path)}
    present = {e["name"]: e for e in (manifest_entry(cb) for cb in trainer.callbacks
                                      if getattr(cb, "is_lightning_ext_technique", False))}
    missing = sorted(set(saved) - set(present))
    if missing:
        raise RuntimeError(
            f"checkpoint {ckpt_path} was trained with techniques {missing} that this trainer does not have; they "
            f"change the model before its weights load. Add the same callbacks (saved arguments: "
            f"{[saved[m]['init_args'] for m in missing]}), or build them with "
            "lightning_ext.manifest.techniques_from_checkpoint(ckpt_path).")
    changed = [n for n in saved if saved[n]["init_args"] != present[n]["init_args"]]
    if changed:
        raise RuntimeError(
            "technique arguments differ from the checkpoint's: " + "; ".join(
                f"{n}: checkpoint {saved[n]['init_args']} vs trainer {present[n]['init_args']}" for n in changed))
    trainer._lightning_ext_manifest_checked = str(ckpt_path)
