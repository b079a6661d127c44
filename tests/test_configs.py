"""Config round-trip for every YAML under configs/: parses, --print_config re-parses to the same
config, and `fit` runs 2 steps from it. Registry entries must point at an existing config."""

from __future__ import annotations


import pytest
import yaml

from cli_utils import ROOT, run_cli
from registry import REGISTRY

CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
SHORT_FIT = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
             "--trainer.num_sanity_val_steps=0"]


def test_every_registry_entry_has_a_config():
    for entry in REGISTRY:
        assert entry.config is not None and (ROOT / entry.config).is_file(), entry.name


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_round_trip_and_fit(config, tmp_path):
    printed = run_cli(["fit", "--config", str(config), "--print_config"], cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr[-3000:]
    first = yaml.safe_load(printed.stdout)
    assert first["model"]["class_path"] and first["data"]["class_path"]
    (tmp_path / "printed.yaml").write_text(printed.stdout)
    again = run_cli(["fit", "--config", "printed.yaml", "--print_config"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert yaml.safe_load(again.stdout) == first
    fitted = run_cli(["fit", "--config", "printed.yaml", *SHORT_FIT], cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in fitted.stdout + fitted.stderr
