"""The command line: interpolation, clear errors for bad keys, `lightning` dispatch, resume guard."""

from __future__ import annotations

import pytest
import yaml

from cli_utils import ROOT, run_cli

QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_omegaconf_interpolation_shares_one_value(tmp_path):
    config = yaml.safe_load(QUICKSTART.read_text())
    assert config["model"]["init_args"]["max_seq_len"] == "${data.init_args.seq_len}"
    config["data"]["init_args"]["seq_len"] = 96
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = run_cli(["fit", "--config", "c.yaml", "--print_config"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["init_args"]["max_seq_len"] == 96 == printed["data"]["init_args"]["seq_len"]


@pytest.mark.slow
@pytest.mark.parametrize("override, key", [
    ("--model.init_args.hidden_sizee=3", "hidden_sizee"),
    ("--model.init_args.num_layers=two", "num_layers"),
    ("--trainer.max_stepz=3", "max_stepz"),
])
def test_unknown_or_ill_typed_keys_name_the_key(override, key, tmp_path):
    out = run_cli(["fit", "--config", str(QUICKSTART), override, "--print_config"], cwd=tmp_path)
    assert out.returncode != 0
    assert key in out.stderr, out.stderr[-2000:]


def test_lightning_command_refuses_unknown_subcommand_without_sdk(monkeypatch, capsys):
    from lightning_ext import cli

    monkeypatch.setattr(cli, "_sdk_entry_point", lambda: None)
    with pytest.raises(SystemExit) as exc:
        cli.lightning_main(["login"])
    assert "lightning-ext" in str(exc.value.code) and "lightning-sdk" in str(exc.value.code)


def test_lightning_command_hands_other_subcommands_to_sdk(monkeypatch):
    from lightning_ext import cli

    seen = {}

    class FakeEntryPoint:
        def load(self):
            import sys

            return lambda: seen.setdefault("argv", list(sys.argv)) and 0

    monkeypatch.setattr(cli, "_sdk_entry_point", lambda: FakeEntryPoint())
    monkeypatch.setattr("sys.argv", ["lightning"])
    with pytest.raises(SystemExit):
        cli.lightning_main(["studio", "list"])
    assert seen["argv"] == ["lightning", "studio", "list"]


def test_lightning_command_runs_fit_itself(monkeypatch):
    from lightning_ext import cli

    called = {}
    monkeypatch.setattr(cli, "main", lambda argv: called.setdefault("argv", argv))
    monkeypatch.setattr(cli, "_sdk_entry_point", lambda: pytest.fail("fit must not reach lightning-sdk"))
    cli.lightning_main(["fit", "--config", "x.yaml"])
    assert called["argv"] == ["fit", "--config", "x.yaml"]


@pytest.mark.slow
def test_console_scripts_print_the_same_config(tmp_path):
    """`lightning` and `lightning-ext` (the installed scripts) behave as `python -m lightning_ext`."""
    import subprocess
    import sys
    from pathlib import Path

    reference = run_cli(["fit", "--config", str(QUICKSTART), "--print_config"], cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    for script in ("lightning", "lightning-ext"):
        path = Path(sys.executable).parent / script
        assert path.exists(), f"console script {script} not installed next to {sys.executable}"
        out = subprocess.run([str(path), "fit", "--config", str(QUICKSTART), "--print_config"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert yaml.safe_load(out.stdout) == yaml.safe_load(reference.stdout)
