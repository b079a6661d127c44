"""AdamP / SGDP / FAdam: float64 equivalence with the references, paths equal, exact properties."""

from __future__ import annotations

import copy
import math

import adamp as adamp_ref
import pytest
import pytorch_optimizer
import torch
from torch import nn

from harness import digits_batches
from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.optimizers import SGDP, AdamP, FAdam
from lightning_ext.optimizers._projection import projection_coefficients

STEPS = 60


def bn_mlp() -> nn.Module:
    """Linear layers before BatchNorm carry no bias (its gradient is pure rounding noise, which Adam
    amplifies to O(lr) updates: any two correct implementations would then drift apart ~1e-10)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32, bias=False),
                         nn.BatchNorm1d(32),
                         nn.ReLU(), nn.Linear(32, 10)).double()


def batches(n=STEPS):
    return digits_batches(n)


def train(model: nn.Module, opt: torch.optim.Optimizer, hook=None) -> nn.Module:
    for x, y in batches():
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if hook:
            hook(model)
        opt.step()
    return model


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def run_pair(make_ours, make_ref, model_fn=bn_mlp):
    ours, ref = model_fn(), model_fn()
    train(ours, make_ours(ours.parameters()))
    train(ref, make_ref(ref.parameters()))
    return ours, ref


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_adamp_matches_reference(nesterov, foreach):
    kw = dict(lr=3e-3, weight_decay=1e-2, nesterov=nesterov)
    ours, ref = run_pair(lambda p: AdamP(p, foreach=foreach, **kw), lambda p: adamp_ref.AdamP(p, **kw))
    assert max_diff(ours, ref) <= 1e-10
    # the projection fired: AdamW on the same run ends elsewhere
    adamw = train(bn_mlp(), torch.optim.AdamW(bn_mlp().parameters(), lr=3e-3, weight_decay=1e-2))
    assert max_diff(ours, adamw) > 1e-3


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_sgdp_matches_reference(nesterov, foreach):
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=nesterov)
    ours, ref = run_pair(lambda p: SGDP(p, foreach=foreach, **kw), lambda p: adamp_ref.SGDP(p, **kw))
    assert max_diff(ours, ref) <= 1e-10


def test_adamp_without_projection_is_adamw():
    ours, ref = run_pair(lambda p: AdamP(p, lr=3e-3, weight_decay=1e-2, delta=0.0),
                         lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=1e-2))
    assert max_diff(ours, ref) <= 1e-10


@pytest.mark.parametrize("make", [
    lambda p, fe: AdamP(p, lr=3e-3, weight_decay=1e-2, nesterov=True, foreach=fe),
    lambda p, fe: SGDP(p, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=fe),
    lambda p, fe: FAdam(p, lr=3e-3, foreach=fe),
], ids=["AdamP", "SGDP", "FAdam"])
def test_single_tensor_and_foreach_paths_agree(make):
    a, b = bn_mlp(), bn_mlp()
    train(a, make(a.parameters(), False))
    train(b, make(b.parameters(), True))
    assert max_diff(a, b) <= 1e-12


def test_projection_detects_scale_invariant_weights_only():
    model = bn_mlp()
    fired = {0: 0, 3: 0, 6: 0}
    opt = AdamP(model.parameters(), lr=3e-3)

    def count(m):
        for i in fired:
            w, g = m[i].weight, m[i].weight.grad
            _, projected = projection_coefficients(w, g, torch.randn_like(w), 0.1, 1e-8)
            fired[i] += int(projected)

    train(model, opt, hook=count)
    assert fired == {0: STEPS, 3: STEPS, 6: 0}  # BN-preceded layers always, the head never


def test_projected_rows_are_orthogonal_to_the_weight():
    torch.manual_seed(0)
    w = torch.randn(8, 5, dtype=torch.float64)
    g = torch.randn(8, 5, dtype=torch.float64)
    g -= (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True) * w  # g ⟂ w row-wise
    d = torch.randn(8, 5, dtype=torch.float64)
    coef, projected = projection_coefficients(w, g, d, 0.1, 1e-8)
    d_proj = d - coef * w
    assert bool(projected)
    assert ((d_proj * w).sum(1).abs() <= 1e-6 * d_proj.norm(dim=1)).all()
    # a gradient aligned with the weight is not scale-invariant: no projection
    coef, projected = projection_coefficients(w, w.clone(), d, 0.1, 1e-8)
    assert not bool(projected) and (coef == 0).all()


# --- FAdam ---------------------------------------------------------------------------------------


def fadam_transcription(params, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, clip=1.0, p=0.5,
                        eps_rule="v3"):
    """The paper's algorithm written out, one tensor at a time (float64)."""
    state = {id(w): {"t": 0, "m": torch.zeros_like(w), "f": torch.zeros_like(w)} for w in params}

    def rms(x):
        return x.pow(2).mean().sqrt()

    def step():
        for w in params:
            s = state[id(w)]
            s["t"] += 1
            t, g = s["t"], w.grad
            b2 = betas[1] * (1 - betas[1] ** (t - 1)) / (1 - betas[1] ** t)
            s["f"] = b2 * s["f"] + (1 - b2) * g * g
            r = rms(g)
            eps_t = {"v3": eps * min(1.0, r.item()), "v2": min(eps, 1e-3 * r.item()),
                     "max": eps * max(1.0, r.item())}[eps_rule]
            d = s["f"] ** p + eps_t
            gbar = g / d
            gbar = gbar / max(1.0, rms(gbar).item() / clip)
            s["m"] = betas[0] * s["m"] + (1 - betas[0]) * gbar
            wbar = w.detach() / d
            wbar = wbar / max(1.0, rms(wbar).item() / clip)
            with torch.no_grad():
                w -= lr * (s["m"] + weight_decay * wbar)

    return step


class _StepAdapter:
    def __init__(self, params, step):
        self.params, self.step = list(params), step

    def zero_grad(self):
        for w in self.params:
            w.grad = None


@pytest.mark.parametrize("mode", ["v3", "v2", "max"])
@pytest.mark.parametrize("foreach", [False, True])
def test_fadam_matches_the_papers_algorithm(mode, foreach):
    ours, ref = bn_mlp(), bn_mlp()
    train(ours, FAdam(ours.parameters(), lr=3e-3, eps_mode=mode, dead_coord_wd="paper", foreach=foreach))
    params = list(ref.parameters())
    train(ref, _StepAdapter(params, fadam_transcription(params, eps_rule=mode)))
    assert max_diff(ours, ref) <= 1e-10


@pytest.mark.parametrize("foreach", [False, True])
def test_fadam_matches_pytorch_optimizer_in_pow2p_mode(foreach):
    ours, ref = run_pair(
        lambda p: FAdam(p, lr=3e-3, eps_mode="pow2p", dead_coord_wd="paper", foreach=foreach),
        lambda p: pytorch_optimizer.FAdam(p, lr=3e-3, momentum_dtype=torch.float64, fim_dtype=torch.float64,
                                          foreach=foreach))
    assert max_diff(ours, ref) <= 1e-10


def test_fadam_step_is_bounded_by_clip():
    model = bn_mlp()
    lr, wd, clip = 3e-3, 0.1, 1.0
    opt = FAdam(model.parameters(), lr=lr, weight_decay=wd, clip=clip)
    worst = 0.0
    for x, y in batches():
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for p, b in zip(model.parameters(), before):
            worst = max(worst, ((p - b).pow(2).mean().sqrt() / lr).item())
    assert 0.1 < worst <= clip * (1 + wd) + 1e-12


@pytest.mark.parametrize("mode", ["v3", "v2", "max", "pow2p"])
@pytest.mark.parametrize("dead", ["mask", "paper"])
def test_fadam_all_zero_gradient_stays_finite(mode, dead):
    w = nn.Parameter(torch.randn(4, 3))
    opt = FAdam([w], eps_mode=mode, dead_coord_wd=dead)
    for _ in range(3):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert torch.isfinite(w).all()


def test_fadam_dead_coordinates():
    """'paper' decays weights on always-zero inputs to ~0; 'mask' leaves them, and decays the rest."""
    x, y = load_digits_tensors()
    dead_inputs = (x.std(0) == 0).nonzero().flatten()
    assert len(dead_inputs) >= 1

    def run(mode):
        torch.manual_seed(0)
        layer = nn.Linear(64, 10)
        w0 = layer.weight.detach().clone()
        opt = FAdam(layer.parameters(), lr=1e-2, weight_decay=0.1, dead_coord_wd=mode)
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            idx = torch.randint(0, len(y), (64,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(layer(x[idx]), y[idx]).backward()
            opt.step()
        live = torch.ones(64, dtype=torch.bool)
        live[dead_inputs] = False
        ratio = lambda cols: (layer.weight[:, cols].norm() / w0[:, cols].norm()).item()  # noqa: E731
        return ratio(dead_inputs), ratio(live)

    paper_dead, paper_live = run("paper")
    mask_dead, mask_live = run("mask")
    assert paper_dead < 0.05 and mask_dead == pytest.approx(1.0, abs=1e-6)
    assert mask_live < paper_live


@pytest.mark.parametrize("cls, kwargs, name", [
    (AdamP, {"lr": 0.0}, "lr"), (AdamP, {"betas": (0.9, 1.0)}, "betas"), (AdamP, {"wd_ratio": 2.0}, "wd_ratio"),
    (AdamP, {"delta": -1.0}, "delta"), (SGDP, {"lr": 0.1, "momentum": 1.0}, "momentum"),
    (SGDP, {"lr": 0.1, "dampening": 1.5}, "dampening"), (FAdam, {"clip": 0.0}, "clip"), (FAdam, {"p": 0.0}, "p"),
    (FAdam, {"eps_mode": "v4"}, "eps_mode"), (FAdam, {"dead_coord_wd": "x"}, "dead_coord_wd"),
])
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls([nn.Parameter(torch.zeros(2, 2))], **kwargs)


@pytest.mark.parametrize("make", [lambda p: AdamP(p), lambda p: SGDP(p, lr=0.1), lambda p: FAdam(p)])
def test_flat_partitions_are_refused(make):
    w = nn.Parameter(torch.randn(4, 3))
    opt = make([w])
    flat = nn.Parameter(torch.randn(12))  # what DeepSpeed ZeRO puts in the param groups
    flat.grad = torch.randn(12)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="flat 1-D partitions.*DeepSpeed ZeRO"):
        opt.step()


@pytest.mark.parametrize("make", [lambda p: AdamP(p, weight_decay=0.01), lambda p: FAdam(p)])
def test_state_dict_round_trip_continues_identically(make):
    a = bn_mlp()
    opt_a = make(a.parameters())
    train(a, opt_a)
    b = copy.deepcopy(a)
    opt_b = make(b.parameters())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(a, opt_a)
    train(b, opt_b)
    assert max_diff(a, b) == 0.0
    assert math.isfinite(max_diff(a, bn_mlp()))
