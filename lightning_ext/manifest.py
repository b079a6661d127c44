"""The technique manifest: which techniques a checkpoint was trained with, and their arguments.

Every technique callback (:class:`lightning_ext.callbacks.Technique`) adds one entry
``{"name", "state_key", "class_path", "init_args"}`` to ``checkpoint["lightning_ext"]["techniques"]``:

* ``class_path`` is the class's *public* import path (``lightning_ext.callbacks.LoRA``, the shortest
  package path that exports it), not its defining module, so moving a file keeps old checkpoints loadable;
* ``state_key`` tells two instances of one technique apart (e.g. two adapters on different ``attr``): it is
  the key of the callback's state in ``checkpoint["callbacks"]`` and the key the resume check compares by;
* ``init_args`` holds configuration only: arguments a technique declares as data (``non_config_args``,
  e.g. EVA's ``calibration_dataloader``) are left out, and tuples are written as lists (as YAML gives them).

Checkpoints written before ``state_key`` existed keyed each callback by its class name (one instance per
class); they still load: :func:`saved_callback_state` falls back to that key, and their manifest entries
are compared by name.
Surgery (adapters, quantized layers) changes the model's structure, so the same techniques
must run in ``setup`` — before Lightning loads the weights — when a run resumes:

* :func:`check_manifest` (run by each technique's ``setup`` and by the CLI before ``fit``)
  refuses to resume when a technique of the checkpoint is missing from the trainer, when the trainer has a
  technique the checkpoint was not trained with (also a plain Lightning checkpoint, which has no manifest),
  or when one is present with other arguments, naming each;
* :func:`check_optimizers` (``on_fit_start``: the trainer's optimizers exist, their state has not loaded)
  refuses when the optimizer stack differs — the class of each optimizer and of each wrapper around it, e.g.
  ``[lightning_ext.optimizers.AdamP]`` vs ``[lightning_ext.optimizers.SGDP]``, whose saved state would load into
  the wrong algorithm (SGDP died at its first step with ``KeyError: 'momentum'``). The stack is written by the
  :class:`~lightning_ext.callbacks.Manifest` callback, which every technique and the CLI add;
* to start a *new* run from a checkpoint's weights with another stack, load the weights only:
  :class:`~lightning_ext.callbacks.LoadWeights` (``trainer.callbacks`` / YAML), no ``ckpt_path``; the refusals
  say so.
* :func:`techniques_from_checkpoint` rebuilds the technique callbacks from a checkpoint, for a
  resume or an evaluation that does not have the original config at hand.
"""

from __future__ import annotations

import importlib
import sys
import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_ext._lightning_compat import pending_ckpt_path

MANIFEST_KEY = "lightning_ext"


def load_checkpoint_dict(ckpt_path: str | Path) -> dict[str, Any]:
    """The Lightning checkpoint dict (memory-mapped); for a sharded checkpoint directory, the client state
    that lives beside the shards — ``meta.pt`` of a distributed (FSDP2 / ModelParallel) checkpoint, the
    ``*model_states.pt`` of a DeepSpeed one (``{}`` if there is none)."""
    path = Path(ckpt_path)
    if path.is_dir() and (path / "meta.pt").is_file():
        path = path / "meta.pt"
    elif path.is_dir():
        candidates = sorted(path.rglob("*model_states.pt"))
        if not candidates:
            return {}
        path = candidates[0]
    return _load_file(path)


class CheckpointFileError(RuntimeError):
    """A checkpoint file that cannot be a checkpoint: empty, truncated, or another kind of file."""


def _load_file(path: Path) -> dict[str, Any]:
    """``torch.load`` of a checkpoint file, refusing with the file's name and what is wrong with it instead of
    torch's ``EOFError`` / miniz messages."""
    if not path.is_file():
        raise CheckpointFileError(f"checkpoint {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"checkpoint {path} is empty (0 bytes): its save never completed. Resume from an "
                                  "earlier checkpoint.")
    with open(path, "rb") as f:
        head = f.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(b"PK"):
            raise CheckpointFileError(f"checkpoint {path} is truncated: a zip archive of {size} bytes without its "
                                      "end (central directory), as left by a save that was interrupted. Resume from "
                                      "an earlier checkpoint.")
        if not head.startswith(b"\x80"):  # neither torch's zip format nor its legacy pickle
            raise CheckpointFileError(f"checkpoint {path} is not a torch checkpoint: a {size}-byte file starting "
                                      f"with {head!r}, neither a zip archive (torch.save) nor a pickle")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=head.startswith(b"PK"))
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise CheckpointFileError(f"checkpoint {path} cannot be read by torch.load: {err}") from err


def read_manifest(ckpt_path: str | Path) -> list[dict[str, Any]]:
    """The technique entries saved in a checkpoint file (``[]`` for a plain Lightning checkpoint)."""
    return list(load_checkpoint_dict(ckpt_path).get(MANIFEST_KEY, {}).get("techniques", []))


def public_class_path(cls: type) -> str:
    """The shortest import path that exports ``cls`` (``lightning_ext.callbacks.LoRA``), else its defining one."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = sys.modules.get(".".join(parts[:i]))
        if module is not None and getattr(module, cls.__qualname__, None) is cls:
            return f"{'.'.join(parts[:i])}.{cls.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def plain_value(value: Any) -> Any:
    """Tuples as lists, recursively: a Python default ``("query", "value")`` equals YAML's ``[query, value]``."""
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {k: plain_value(v) for k, v in value.items()}
    return value


def config_args(cls: type, init_args: dict[str, Any]) -> dict[str, Any]:
    """The configuration among ``init_args``: without the arguments ``cls`` declares as data."""
    skip = set(getattr(cls, "non_config_args", ()))
    return {k: plain_value(v) for k, v in init_args.items() if k not in skip}


def _with_later_defaults(cls: type, saved_args: dict[str, Any]) -> dict[str, Any]:
    """``saved_args`` plus the default of every argument ``cls`` gained after the checkpoint was written (a
    checkpoint that predates e.g. the adapters' ``seed`` trained with what that default means)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    later = {k: plain_value(p.default) for k, p in params.items()
             if k not in saved_args and k != "self" and p.default is not inspect.Parameter.empty}
    return config_args(cls, {**saved_args, **later})


def manifest_entry(callback: pl.Callback) -> dict[str, Any]:
    cls = type(callback)
    return {"name": getattr(callback, "technique_name", cls.__name__),
            "state_key": callback.state_key,
            "class_path": public_class_path(cls),
            "init_args": config_args(cls, getattr(callback, "init_args", {}))}


def saved_callback_state(checkpoint: dict[str, Any], callback: pl.Callback) -> dict[str, Any] | None:
    """The callback's state in a checkpoint dict: under its ``state_key``, else under its class name (how
    checkpoints written before instance-specific state keys stored it)."""
    states = checkpoint.get("callbacks") or {}
    if callback.state_key in states:
        return states[callback.state_key]
    return states.get(type(callback).__qualname__)


def _technique_class(entry: dict[str, Any]) -> type:
    module_name, _, cls_name = entry["class_path"].rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError):  # a defining module that has moved since: the public name
        import lightning_ext.callbacks

        if hasattr(lightning_ext.callbacks, entry["name"]):
            return getattr(lightning_ext.callbacks, entry["name"])
        raise


def techniques_from_checkpoint(ckpt_path: str | Path) -> list[pl.Callback]:
    """Instantiate the technique callbacks a checkpoint was trained with (same arguments)."""
    callbacks = []
    for entry in read_manifest(ckpt_path):
        cls = _technique_class(entry)
        callbacks.append(cls(**config_args(cls, entry["init_args"])))
    return callbacks


WEIGHTS_ONLY_HINT = ("To start a new run from its weights with this stack instead, load the weights only: add the "
                     "callback lightning_ext.callbacks.LoadWeights(ckpt_path=...) and drop ckpt_path.")


def optimizer_stack(optimizer: Any) -> list[str]:
    """The classes of an optimizer and of every wrapper around it, outermost first (public import paths). A
    strategy's own wrapper (DeepSpeed's ZeRO optimizers) is looked through: it is not the user's choice."""
    from lightning_ext.optimizers._wrapper import WrapperOptimizer

    stack = []
    while optimizer is not None:
        cls = type(optimizer)
        if cls.__module__.startswith(("deepspeed.", "lightning.")):
            optimizer = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
            continue
        stack.append(public_class_path(cls))
        optimizer = optimizer.base if isinstance(optimizer, WrapperOptimizer) else None
    return stack


def write_optimizers(trainer: pl.Trainer, checkpoint: dict[str, Any]) -> None:
    """Record the trainer's optimizer stacks (and that the checkpoint has a manifest) in ``checkpoint``."""
    section = checkpoint.setdefault(MANIFEST_KEY, {})
    section.setdefault("techniques", [])
    section["optimizers"] = [optimizer_stack(o) for o in trainer.optimizers]


def check_optimizers(trainer: pl.Trainer, ckpt_path: str | Path | None = None) -> None:
    """Refuse to resume when the trainer's optimizer stacks differ from the ones the checkpoint recorded
    (nothing to compare in a checkpoint without them: older, or saved without :class:`Manifest`)."""
    ckpt_path = ckpt_path if ckpt_path is not None else pending_ckpt_path(trainer)
    if ckpt_path is None or not Path(ckpt_path).exists():
        return
    saved = load_checkpoint_dict(ckpt_path).get(MANIFEST_KEY, {}).get("optimizers")
    present = [optimizer_stack(o) for o in trainer.optimizers]
    if saved is not None and saved != present:
        raise RuntimeError(f"checkpoint {ckpt_path} was trained with optimizer {_stacks(saved)}; this trainer has "
                           f"{_stacks(present)}. Its optimizer state (param groups, per-parameter state) belongs to "
                           f"the other algorithm. Resume with the checkpoint's optimizer. {WEIGHTS_ONLY_HINT}")


def _stacks(stacks: list[list[str]]) -> str:
    return "; ".join(" around ".join(s) for s in stacks) or "none"


def _legacy_name(entry: dict[str, Any]) -> str:
    """An old entry's technique name: every peft adapter was once saved as its shared base ``_PeftAdapter``; its
    class path still names it."""
    if entry["name"] == "_PeftAdapter" and "class_path" in entry:
        return entry["class_path"].rpartition(".")[2]
    return entry["name"]


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
    checkpoint = load_checkpoint_dict(ckpt_path)
    saved_entries = list(checkpoint.get(MANIFEST_KEY, {}).get("techniques", []))
    techniques = [cb for cb in trainer.callbacks if getattr(cb, "is_lightning_ext_technique", False)]
    by = "name" if any("state_key" not in e for e in saved_entries) else "state_key"  # older checkpoints: by name
    saved = {(_legacy_name(e) if by == "name" else e[by]): e for e in saved_entries}
    pairs = [(manifest_entry(cb), type(cb)) for cb in techniques]
    present = {e[by]: e for e, _ in pairs}
    classes = {e[by]: cls for e, cls in pairs}
    missing = sorted(set(saved) - set(present))
    if missing:
        raise RuntimeError(
            f"checkpoint {ckpt_path} was trained with techniques {missing} that this trainer does not have (it "
            f"has {sorted(set(present) - set(saved)) or 'no other'}); they "
            f"change the model before its weights load. Add the same callbacks (saved arguments: "
            f"{[saved[m]['init_args'] for m in missing]}), or build them with "
            "lightning_ext.manifest.techniques_from_checkpoint(ckpt_path).")
    added = sorted(set(present) - set(saved))
    if added:
        trained = (f"with techniques {sorted(saved)} only" if saved else
                   "without any technique" if MANIFEST_KEY in checkpoint else
                   "without any technique (a plain Lightning checkpoint, no manifest)")
        raise RuntimeError(
            f"checkpoint {ckpt_path} was trained {trained}; this trainer adds {added}. Resuming would restore "
            f"a run that never had them and go on as if it had (their state starts fresh mid-run). Remove them to "
            f"resume. {WEIGHTS_ONLY_HINT}")
    for key, entry in saved.items():  # saved as the present class counts configuration (older ones kept data too)
        entry["init_args"] = _with_later_defaults(classes[key], entry["init_args"])
    changed = [n for n in saved if saved[n]["init_args"] != present[n]["init_args"]]
    if changed:
        raise RuntimeError(
            "technique arguments differ from the checkpoint's: " + "; ".join(
                f"{n}: checkpoint {saved[n]['init_args']} vs trainer {present[n]['init_args']}" for n in changed))
    trainer._lightning_ext_manifest_checked = str(ckpt_path)
