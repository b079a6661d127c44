"""LAWN: the optimizer wrapper against a transcription of the (reconstructed) algorithm, its exact
properties, state layout and resume, and the callback inside Lightning."""

from __future__ import annotations

import copy
import itertools

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_ext.callbacks import LAWN as LAWNCallback
from lightning_ext.data import DigitsDataModule
from harness import digits_batches
from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.models import MLPClassifier
from lightning_ext.optimizers import LAWN

STEPS, FREE = 40, 10


def model64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, 10, bias=False)).double()


def batches(n=STEPS):
    return digits_batches(n)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def transcription(model, scope, constraint, project_grad, free=FREE):
    """§4.2 written out with a bare Adam: free steps, then record radii, [project], step, re-scale."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    w = model[3].weight

    def norm(t):
        return t.norm() if scope == "layer" else t.norm(dim=1, keepdim=True)

    radius = None
    for t, (x, y) in enumerate(batches()):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        if t >= free:
            if radius is None:
                radius = norm(w.detach()).clone()
            if project_grad:
                unit = w.detach() / norm(w.detach())
                dot = (w.grad * unit).sum() if scope == "layer" else (w.grad * unit).sum(1, keepdim=True)
                w.grad -= unit * dot
        opt.step()
        if t >= free:
            with torch.no_grad():
                scale = radius / norm(w)
                w.mul_(scale.clamp_max(1.0) if constraint == "ball" else scale)
    return model


def run_lawn(model, free=FREE, **kw):
    opt = LAWN(torch.optim.Adam(model.parameters(), lr=1e-2), [model[3].weight], free_steps=free, **kw)
    norms, dtype = [], next(model.parameters()).dtype
    for x, y in batches():
        opt.zero_grad()
        loss_of(model, x.to(dtype), y).backward()
        opt.step()
        norms.append(model[3].weight.detach().norm().item())
    return model, opt, norms


@pytest.mark.parametrize("scope, constraint, project_grad",
                         list(itertools.product(["layer", "row"], ["sphere", "ball"], [False, True])))
def test_matches_the_transcription(scope, constraint, project_grad):
    ours, _, _ = run_lawn(model64(), norm_scope=scope, constraint=constraint, project_grad=project_grad)
    ref = transcription(model64(), scope, constraint, project_grad)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_free_phase_only_is_the_bare_optimizer_bit_for_bit():
    ours, _, _ = run_lawn(model64(), free=STEPS)
    ref = transcription(model64(), "layer", "sphere", False, free=STEPS)
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), ref.parameters()))


def test_norm_is_held_at_the_radius_after_the_free_phase():
    model = model64().float()
    _, opt, norms = run_lawn(model)
    radius = opt.radii()[0].item()
    assert norms[FREE - 1] == pytest.approx(radius, rel=1e-6)  # recorded where the free phase ended
    assert all(abs(n - radius) <= 1e-5 * radius for n in norms[FREE:])
    assert len(set(round(n, 6) for n in norms[:FREE])) > 1  # the free phase really moved the norm


def test_ball_never_exceeds_the_radius():
    _, opt, norms = run_lawn(model64(), constraint="ball")
    radius = opt.radii()[0].item()
    assert all(n <= radius * (1 + 1e-12) for n in norms[FREE:])


def test_state_layout_is_the_base_optimizers_and_resume_is_exact():
    model = model64()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = LAWN(base, [model[3].weight], free_steps=FREE)
    data = list(batches())
    for x, y in data[:15]:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert saved.keys() == base.state_dict().keys() and saved["param_groups"][0]["lawn_step"] == 15
    twin = copy.deepcopy(model)
    opt2 = LAWN(torch.optim.Adam(twin.parameters(), lr=1e-2), [twin[3].weight], free_steps=FREE)
    opt2.load_state_dict(saved)
    assert opt2._steps == 15 and torch.equal(opt2.radii()[0], opt.radii()[0])
    for m, o in ((model, opt), (twin, opt2)):
        for x, y in data[15:]:
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


def test_bad_arguments():
    model = model64()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="free_steps"):
        LAWN(base, [model[3].weight], free_steps=-1)
    with pytest.raises(ValueError, match="norm_scope"):
        LAWN(base, [model[3].weight], free_steps=1, norm_scope="col")
    with pytest.raises(ValueError, match="not parameters of the wrapped optimizer"):
        LAWN(base, [nn.Parameter(torch.zeros(3, 3))], free_steps=1)
    with pytest.raises(ValueError, match="free_steps"):
        LAWNCallback(free_steps=-2)


def _fit(callbacks, steps=60, accumulate=1, lr=1e-2):
    pl.seed_everything(0, verbose=False)
    model = MLPClassifier(hidden=[32], batch_norm=True, lr=lr)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                         accumulate_grad_batches=accumulate, callbacks=callbacks)
    trainer.fit(model, datamodule=DigitsDataModule())
    return model, trainer


def test_callback_wraps_the_modules_optimizer_once_per_real_step():
    with pytest.warns(UserWarning, match="bias"):
        model, trainer = _fit([LAWNCallback(free_steps=5, layers=["net.3"])], steps=12, accumulate=4)
    opt = trainer.optimizers[0]
    assert isinstance(opt, LAWN) and opt._steps == trainer.global_step == 12
    torch.testing.assert_close(model.net[3].weight.norm(), opt.radii()[0], rtol=1e-5, atol=0)


def test_callback_auto_selects_the_head_and_attenuates_logits():
    """The paper's mechanism: bounded head norm -> smaller logits, training loss does not collapse."""
    x, y = load_digits_tensors()
    plain, _ = _fit([], steps=300, lr=1e-2)
    with pytest.warns(UserWarning, match="'net.3'"):
        lawn, _ = _fit([LAWNCallback(free_steps=30)], steps=300, lr=1e-2)
    for m in (plain, lawn):
        m.eval()
    with torch.no_grad():
        logits_plain, logits_lawn = plain(x), lawn(x)
    assert logits_lawn.norm(dim=1).mean() < logits_plain.norm(dim=1).mean()
    assert nn.functional.cross_entropy(logits_lawn, y) > nn.functional.cross_entropy(logits_plain, y)


def test_wraps_a_bitsandbytes_8bit_optimizer():
    """bitsandbytes' 8-bit AdamW (runs on CPU) as LAWN's base: constraint holds, state round-trips."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 512, bias=False))  # 8-bit state: >4096
    opt = LAWN(bnb.optim.AdamW8bit(model.parameters(), lr=1e-3), [model[2].weight], free_steps=2)
    data = [torch.randn(8, 64, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    norms = []
    for x in data[:5]:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        norms.append(model[2].weight.norm().item())
    radius = opt.radii()[0].item()
    assert norms[0] != norms[1] and all(abs(n - radius) <= 1e-5 * radius for n in norms[2:])
    twin = copy.deepcopy(model)
    opt2 = LAWN(bnb.optim.AdamW8bit(twin.parameters(), lr=1e-3), [twin[2].weight], free_steps=2)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for m, o in ((model, opt), (twin, opt2)):
        for x in data[5:]:
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
