"""The package layout: checkpoints written before technique classes moved still resume."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from fixtures.pre_move import STOP, entries
from harness import clone, differences, fit, technique_callbacks

FIXTURES = Path(__file__).parent / "fixtures" / "pre_move"


class _AtStart(pl.Callback):
    """What the trainer holds once the checkpoint is restored (before the first resumed step)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seen = clone({"state_dict": pl_module.state_dict(), "callbacks": technique_callbacks(trainer),
                           "global_step": trainer.global_step})


@pytest.mark.parametrize("name", sorted(entries()))
def test_a_checkpoint_written_before_the_move_resumes(name, tmp_path):
    entry = entries()[name]
    path = FIXTURES / f"{name}.ckpt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    probe = _AtStart()
    trainer = fit(entry, tmp_path, STOP + 2, ckpt_path=str(path), callbacks=[probe])
    assert probe.seen["global_step"] == STOP
    assert differences(saved["state_dict"], probe.seen["state_dict"]) == []
    technique_state = {k: v for k, v in saved["callbacks"].items() if not k.startswith("ModelCheckpoint")}
    seen = {k: v for k, v in probe.seen["callbacks"].items() if k != "NonFiniteGuard"}  # added after these files
    assert differences(technique_state, seen) == []  # every saved state, under its saved key
    assert trainer.global_step == STOP + 2


def test_no_file_the_tests_read_is_ignored_by_git():
    """A fixture that ``.gitignore`` swallows exists on the machine that wrote it and nowhere else (CI's clone)."""
    import shutil
    import subprocess

    root = Path(__file__).parent.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(root)) for p in (root / "tests").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *files], check=False, cwd=root, capture_output=True, text=True)
    assert ignored.stdout.split() == [], f"ignored by .gitignore, so absent from a clone: {ignored.stdout.split()}"


def _room_imports() -> dict[str, set[str]]:
    """Which top-level rooms of the package (``callbacks``, ``nn``, ``data``, ``losses``, ...) each room imports,
    at any depth, including imports inside functions (a lazy import is still a dependency)."""
    import ast

    package = Path(__file__).parent.parent / "lightning_ext"
    edges: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        here = parts[0] if parts[0] != "__init__" else "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_ext."):
                there = node.module.split(".")[1]
                if there != here:
                    edges.setdefault(here, set()).add(there)
    return edges


def test_the_rooms_of_the_package_import_each_other_without_a_cycle():
    """A newcomer reads a room without first reading the room that reads it: data and models, callbacks and nn,
    optimizers and callbacks never import each other both ways."""
    edges = _room_imports()
    assert "callbacks" in edges and "nn" in edges["callbacks"]  # the walk sees the imports

    def cycle_from(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                return [*path[path.index(nxt):], nxt]
            found = cycle_from(nxt, [*path, nxt])
            if found:
                return found
        return None

    cycles = [c for c in (cycle_from(room, [room]) for room in sorted(edges)) if c]
    assert cycles == [], f"import cycles between rooms: {cycles}"


def test_every_module_of_the_package_imports():
    """A module that imports a script by its old path (``from verify_quest import ...``) fails here, not in
    the one slow test that happens to load it."""
    import importlib
    import pkgutil

    import lightning_ext

    names = [m.name for m in pkgutil.walk_packages(lightning_ext.__path__, "lightning_ext.")]
    assert "lightning_ext.claims.onebit" in names and len(names) > 60
    for name in names:
        importlib.import_module(name)
