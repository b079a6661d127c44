"""The YAML `optimizer:` section builds what it names: LAWN / CrAM with a nested base optimizer,
and bitsandbytes' 8-bit AdamW alone or as LAWN's base. (test_configs fits each YAML for 2 steps.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cli_utils import ROOT
from lightning_ext.cli import LightningExtCLI
from lightning_ext.optimizers import CrAM, LAWN
from lightning_ext.optimizers import cli as optimizers_cli


def configured_optimizer(config: str):
    cli = LightningExtCLI(args=["--config", str(ROOT / "configs" / config)], run=False)
    # LightningCLI replaced configure_optimizers with one building the `optimizer:` section
    return cli.model, cli.model.configure_optimizers()


def test_lawn_section_wraps_a_bitsandbytes_base_around_the_head():
    bnb = pytest.importorskip("bitsandbytes")
    model, opt = configured_optimizer("lawn_optimizer.yaml")
    assert isinstance(opt, LAWN) and isinstance(opt.base, bnb.optim.AdamW8bit)
    assert opt.base.defaults["lr"] == 1e-3 and opt.free_steps == 100
    last_linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert len(opt.constrained) == 1 and opt.constrained[0] is last_linear.weight
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}


def test_cram_section_wraps_sgd_and_prunes_every_matrix():
    model, opt = configured_optimizer("cram_optimizer.yaml")
    assert isinstance(opt, CrAM) and type(opt.base) is torch.optim.SGD
    assert opt.base.defaults["momentum"] == 0.9 and opt.rho == 0.1 and opt.sparsities == [0.5, 0.7, 0.9]
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    assert [id(p) for p in opt.prunable] == [id(p) for p in matrices]


def test_bitsandbytes_optimizer_from_yaml():
    bnb = pytest.importorskip("bitsandbytes")
    _, opt = configured_optimizer("optimizers/adamw8bit.yaml")
    assert isinstance(opt, bnb.optim.AdamW8bit) and opt.defaults["weight_decay"] == 0.01


def test_python_form_accepts_a_callable_and_names_bad_input():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = optimizers_cli.LAWN(model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), free_steps=3,
                              constrained_last=2)
    assert [p.shape for p in opt.constrained] == [torch.Size([8, 4]), torch.Size([2, 8])]
    with pytest.raises(ValueError, match=r"constrained_last=3, but the parameters hold only 2 .*\(8, 4\)"):
        optimizers_cli.LAWN(model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), free_steps=3,
                            constrained_last=3)
    with pytest.raises(ValueError, match="constrained_last must be an int >= 1, got 0"):
        optimizers_cli.LAWN(model.parameters(), lambda p: torch.optim.SGD(p, lr=0.1), free_steps=3,
                            constrained_last=0)
    with pytest.raises(TypeError, match="not an instance"):
        optimizers_cli.CrAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))
    spec = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "momentum": 0.5}}
    cram = optimizers_cli.CrAM(model.parameters(), spec, rho=0.2)
    assert cram.base.defaults["momentum"] == 0.5 and len(cram.prunable) == 2
