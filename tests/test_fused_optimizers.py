"""fused=True (the C++ CPU kernels) equals the eager single-tensor path and the references.

The first test in a fresh environment compiles the extension (about a minute on 2 cores).
"""

from __future__ import annotations

import copy

import adamp as adamp_ref
import pytest
import torch
from torch import nn

from lightning_ext.optimizers import SGDP, AdamP, FAdam
from test_optimizers import bn_mlp, max_diff, run_pair, train


def conv_bn_net() -> nn.Module:
    """4-D weights (the projection's channel view is a reshape) and a head where it does not fire."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            return self.head(self.conv(x.view(-1, 1, 8, 8)))

    return Net().double()


PAIRS = {
    "AdamP": lambda p, fused: AdamP(p, lr=3e-3, weight_decay=1e-2, fused=fused),
    "AdamP-nesterov": lambda p, fused: AdamP(p, lr=3e-3, weight_decay=1e-2, nesterov=True, fused=fused),
    "SGDP": lambda p, fused: SGDP(p, lr=0.05, momentum=0.9, weight_decay=1e-3, fused=fused),
    "SGDP-nesterov": lambda p, fused: SGDP(p, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True,
                                           fused=fused),
    "FAdam": lambda p, fused: FAdam(p, lr=3e-3, fused=fused),
    "FAdam-paper-wd": lambda p, fused: FAdam(p, lr=3e-3, dead_coord_wd="paper", fused=fused),
    "FAdam-v2": lambda p, fused: FAdam(p, lr=3e-3, eps_mode="v2", fused=fused),
    "FAdam-max": lambda p, fused: FAdam(p, lr=3e-3, eps_mode="max", fused=fused),
    "FAdam-pow2p-p0.4": lambda p, fused: FAdam(p, lr=3e-3, eps_mode="pow2p", p=0.4, fused=fused),
}


@pytest.mark.parametrize("model_fn", [bn_mlp, conv_bn_net], ids=["mlp", "conv"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_fused_equals_single_tensor_path_in_float64(name, model_fn):
    make = PAIRS[name]
    eager, fused = model_fn(), model_fn()
    train(eager, make(eager.parameters(), False))
    train(fused, make(fused.parameters(), True))
    assert max_diff(eager, fused) <= 1e-12
    # and the run moved the weights (an optimizer that did nothing would also "agree")
    assert max_diff(fused, model_fn()) > 1e-3


@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_adamp_matches_the_reference(nesterov):
    kw = dict(lr=3e-3, weight_decay=1e-2, nesterov=nesterov)
    ours, ref = run_pair(lambda p: AdamP(p, fused=True, **kw), lambda p: adamp_ref.AdamP(p, **kw), conv_bn_net)
    assert max_diff(ours, ref) <= 1e-10


def test_fused_float32_close_to_eager():
    def run(fused):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
        opt = AdamP(model.parameters(), lr=1e-3, weight_decay=1e-2, fused=fused)
        for x, y in _float_batches():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model

    assert max_diff(run(False), run(True)) <= 1e-5


def _float_batches():
    from harness import digits_batches
    return [(x.float(), y) for x, y in digits_batches(20)]


def test_fused_bumps_autograd_versions():
    """The kernels write through pointers; autograd must still see the in-place change."""
    w = nn.Parameter(torch.randn(4, 4, dtype=torch.float64))
    opt = AdamP([w], fused=True)
    out = (w * w).sum()  # saves w for backward
    w.grad = torch.ones_like(w)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


@pytest.mark.parametrize("cls, kw", [(AdamP, {}), (SGDP, {"lr": 0.1}), (FAdam, {})])
def test_fused_refuses_what_it_cannot_run(cls, kw):
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        cls([nn.Parameter(torch.zeros(2, 2))], fused=True, foreach=True, **kw)
    with pytest.raises(ValueError, match=r"fused=True\) supports contiguous float32/float64 CPU"):
        cls([nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))], fused=True, **kw)
    with pytest.raises(ValueError, match="non-contiguous"):
        cls([nn.Parameter(torch.zeros(3, 2).t())], fused=True, **kw)


def test_fused_state_dict_resumes_on_the_eager_path():
    """The state layout is shared: a fused run's checkpoint continues identically without fused."""
    a, b = bn_mlp(), bn_mlp()
    opt_a = AdamP(a.parameters(), lr=3e-3, weight_decay=1e-2, fused=True)
    train(a, opt_a)
    b.load_state_dict(a.state_dict())
    opt_b = AdamP(b.parameters(), lr=3e-3, weight_decay=1e-2, fused=False)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert all(g["fused"] for g in opt_b.param_groups)  # hyperparameters come from the checkpoint, as in torch
    for group in opt_b.param_groups:
        group["fused"] = False
    train(a, opt_a)
    train(b, opt_b)
    assert max_diff(a, b) <= 1e-12


@pytest.mark.parametrize("cls,kw", [(AdamP, {"lr": 1e-3}), (SGDP, {"lr": 0.1, "momentum": 0.9}), (FAdam, {"lr": 1e-3})])
def test_default_takes_the_fused_step_where_it_can(cls, kw, monkeypatch):
    """fused=None is the fastest available path: the kernels for plain CPU float tensors; a path the user names
    (foreach=False/True) is kept; tensors the kernels cannot take, and a machine where they cannot build (one log
    line), get the eager paths instead of an error."""
    from lightning_ext.optimizers import _fused_cpu, adamp, fadam

    calls = []
    ext = _fused_cpu.extension()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(ext, name)

    monkeypatch.setattr(_fused_cpu, "extension", lambda: Spy())

    def step(params, **extra):
        calls.clear()
        opt = cls(params, **kw, **extra)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return bool(calls)

    assert step([nn.Parameter(torch.randn(8, 4))])
    assert step([nn.Parameter(torch.randn(8, 4, dtype=torch.float64))])
    assert not step([nn.Parameter(torch.randn(8, 4))], foreach=False)
    assert not step([nn.Parameter(torch.randn(8, 4))], foreach=True)
    assert not step([nn.Parameter(torch.randn(8, 4))], fused=False)
    assert not step([nn.Parameter(torch.randn(4, 8).t())])  # non-contiguous: the eager path, no refusal
    assert not step([nn.Parameter(torch.randn(8, 4, dtype=torch.bfloat16))])
    assert adamp.resolve_fused is fadam.resolve_fused
    monkeypatch.setattr(_fused_cpu, "optional_extension", lambda: None)  # no compiler: the eager path
    assert not step([nn.Parameter(torch.randn(8, 4))])


def test_default_fused_step_is_the_fused_step_bit_for_bit():
    """The default and fused=True are the same arithmetic (so every fused test above covers the default)."""
    model = bn_mlp()
    runs = []
    for fused in (None, True):
        m = copy.deepcopy(model)
        train(m, AdamP(m.parameters(), lr=3e-3, weight_decay=1e-2, fused=fused))
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(runs[0], runs[1])
