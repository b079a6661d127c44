"""CrAM: float64 transcription of the algorithm, reductions to the base optimizer, masks, restore,
BatchNorm untouched by pass 2, rank-independent draws, base momentum surviving a state_dict round trip."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from harness import digits_batches
from lightning_ext.data.digits import load_digits_tensors
from lightning_ext.nn import nm_mask, one_shot_prune, recalibrate_batchnorm, topk_masks
from lightning_ext.callbacks import CrAM as CrAMCallback
from lightning_ext.optimizers import CrAM

STEPS = 30


def mlp(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(32)] if bn else []
    return nn.Sequential(nn.Linear(64, 32), *mid, nn.ReLU(), nn.Linear(32, 10)).double()


def batches(n=STEPS):
    return digits_batches(n)


def closure_for(model, opt, x, y, grad_scale=1.0):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y) * grad_scale
        loss.backward()
        return loss
    return closure


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


def transcription(model, rho, sparsity, plus, sparse_grad, make_opt=sgd, dtype=torch.float64):
    """§5.2 written out for global top-k with one sparsity (keeping ceil(n(1-s)) weights)."""
    opt = make_opt(model.parameters())
    params = list(model.parameters())
    prunable = [p for p in params if p.dim() > 1]
    for x, y in digits_batches(STEPS, dtype=dtype):
        loss = lambda: nn.functional.cross_entropy(model(x), y)  # noqa: E731
        opt.zero_grad()
        loss().backward()
        g = [p.grad.clone() for p in params]
        theta = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, gi in zip(params, g):
                p += rho * gi
            flat = torch.cat([p.abs().flatten() for p in prunable])
            keep = math.ceil(flat.numel() * (1 - sparsity))
            thr = flat.sort(descending=True).values[keep - 1]
            masks = [p.abs() >= thr for p in prunable]
            for p, m in zip(prunable, masks):
                p *= m
        opt.zero_grad()
        loss().backward()
        with torch.no_grad():
            if sparse_grad:
                for p, m in zip(prunable, masks):
                    p.grad *= m
            for p, t in zip(params, theta):
                p.copy_(t)
            if plus:
                for p, gi in zip(params, g):
                    p.grad += gi
        opt.step()
    return model


def run_cram(model, make_opt=sgd, dtype=torch.float64, **kw):
    opt = CrAM(make_opt(model.parameters()), model=model, **kw)
    for x, y in digits_batches(STEPS, dtype=dtype):
        opt.step(closure_for(model, opt, x, y))
    return model, opt


def max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("plus, sparse_grad", [(True, True), (False, True), (True, False)])
def test_matches_the_transcription(plus, sparse_grad):
    ours, _ = run_cram(mlp(), rho=0.05, sparsities=[0.7], plus=plus, sparse_grad=sparse_grad)
    ref = transcription(mlp(), 0.05, 0.7, plus, sparse_grad)
    assert max_diff(ours, ref) <= 1e-10
    plain = mlp()
    opt = sgd(plain.parameters())
    for x, y in batches():
        closure_for(plain, opt, x, y)()
        opt.step()
    assert max_diff(ours, plain) > 1e-3  # CrAM changed the trajectory


@pytest.mark.parametrize("layout", ["own storage", "views of one flat buffer"])
def test_perturbation_and_restore_by_storage_layout(layout):
    """A parameter that is all of its storage is pointed at a kept buffer for pass 2 and back (nothing copied);
    parameters sharing one flat buffer (DeepSpeed's, FSDP's layout) are perturbed in place and copied back, the
    buffer kept. Both equal the float64 transcription."""
    model = mlp()
    params = list(model.parameters())
    flat = None
    if layout != "own storage":
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        at = 0
        for p in params:
            p.data = flat[at:at + p.numel()].view_as(p)
            at += p.numel()
    ptrs = [p.data_ptr() for p in params]
    opt = CrAM(sgd(params), model=model, rho=0.05, sparsities=[0.7])
    during = []
    for x, y in digits_batches(STEPS, dtype=torch.float64):
        inner = closure_for(model, opt, x, y)

        def closure():
            during.append([p.data_ptr() for p in params])
            return inner()

        opt.step(closure)
        assert [p.data_ptr() for p in params] == ptrs  # restored into the parameters' own storage
    pass_two = during[1::2]
    if flat is None:
        assert all(all(a != b for a, b in zip(seen, ptrs)) for seen in pass_two)
    else:
        assert all(seen == ptrs for seen in pass_two)
        assert flat.data_ptr() == ptrs[0]
    ref = transcription(mlp(), 0.05, 0.7, True, True)
    assert max_diff(model, ref) <= 1e-10


@pytest.mark.parametrize("plus", [True, False])
def test_reductions_to_the_base_optimizer(plus):
    """rho = 0 and sparsity 0: CrAM is the base optimizer; CrAM+ the base with a doubled gradient."""
    ours, _ = run_cram(mlp(), rho=0.0, sparsities=[0.0], plus=plus)
    ref = mlp()
    opt = sgd(ref.parameters())
    for x, y in batches():
        closure_for(ref, opt, x, y, grad_scale=2.0 if plus else 1.0)()
        opt.step()
    assert max_diff(ours, ref) <= 1e-12


def test_masks_keep_the_requested_counts():
    torch.manual_seed(0)
    tensors = [torch.randn(30, 20), torch.randn(7, 9)]
    for s in (0.5, 0.7, 0.9):
        masks = topk_masks(tensors, s)
        assert sum(int(m.sum()) for m in masks) == math.ceil(663 * (1 - s))
        kept = torch.cat([t[m].abs() for t, m in zip(tensors, masks)]).min()
        dropped = torch.cat([t[~m].abs() for t, m in zip(tensors, masks)]).max()
        assert kept >= dropped
        for t, m in zip(tensors, topk_masks(tensors, s, scope="layer")):
            assert int(m.sum()) == math.ceil(t.numel() * (1 - s))
    conv = torch.randn(8, 16, 3, 3)
    for n, m in ((2, 4), (4, 8)):
        mask = nm_mask(conv, n, m)
        groups = mask.permute(0, 2, 3, 1).reshape(-1, m)  # along input channels
        assert (groups.sum(1) == n).all()
        lin = nm_mask(torch.randn(5, 16), n, m)
        assert (lin.reshape(-1, m).sum(1) == n).all()
    assert nm_mask(torch.randn(3, 3), 2, 4) is None  # does not tile: left dense


def test_parameters_restored_in_place_and_batchnorm_stats_untouched_by_pass_two():
    model = mlp(bn=True)
    bn = model[1]
    opt = CrAM(sgd(model.parameters()), model=model, rho=0.1, sparsities=[0.9])
    ptrs = [p.data_ptr() for p in model.parameters()]
    x, y = next(iter(batches(1)))
    seen = []
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        seen.append(bn.running_mean.clone())
        return loss

    opt.step(closure)
    assert calls["n"] == 2
    assert torch.equal(bn.running_mean, seen[0])  # only pass 1's update survives
    assert not torch.equal(seen[0], seen[1])  # pass 2 did see (and would have changed) other statistics
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert int(bn.num_batches_tracked) == 1


def test_draws_are_seeded_by_step_identically_everywhere():
    a = CrAM(sgd(mlp().parameters()), sparsities=[0.5, 0.7, 0.9], seed=3)
    b = CrAM(sgd(mlp().parameters()), sparsities=[0.5, 0.7, 0.9], seed=3)
    draws_a, draws_b = [], []
    for step in range(20):
        a._steps = b._steps = step
        draws_a.append(a._draw())
        draws_b.append(b._draw())
    assert draws_a == draws_b and len(set(draws_a)) == 3


def test_state_dict_is_the_base_and_keeps_momentum():
    model, opt = run_cram(mlp(), rho=0.05, sparsities=[0.5, 0.9])
    saved = copy.deepcopy(opt.state_dict())
    base_keys = {k for s in saved["state"].values() for k in s}
    assert base_keys == {"momentum_buffer"}  # no backups, masks or clean gradients
    twin = copy.deepcopy(model)
    opt2 = CrAM(sgd(twin.parameters()), model=twin, rho=0.05, sparsities=[0.5, 0.9])
    opt2.load_state_dict(saved)
    assert opt2._steps == STEPS
    assert all(torch.equal(opt2.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
               for p, q in zip(twin.parameters(), model.parameters()))
    for m, o in ((model, opt), (twin, opt2)):
        for x, y in itertools.islice(batches(40), 30, 40):
            o.step(closure_for(m, o, x, y))
    assert max_diff(model, twin) == 0.0


def test_needs_a_closure_and_checks_arguments():
    opt = CrAM(sgd(mlp().parameters()))
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()
    for kwargs, name in (({"rho": -1}, "rho"), ({"sparsities": [1.0]}, "sparsities"),
                         ({"compression": "svd"}, "compression"), ({"nm_patterns": [(5, 4)]}, "nm_patterns")):
        with pytest.raises(ValueError, match=name):
            CrAM(sgd(mlp().parameters()), **kwargs)
        with pytest.raises(ValueError, match=name):  # the callback checks in __init__, before setup
            CrAMCallback(**kwargs)


def test_one_shot_prune_and_batchnorm_recalibration():
    model = mlp(bn=True).float()
    masks = one_shot_prune(model, 0.8)
    prunable = [p for p in model.parameters() if p.dim() > 1]
    assert sum(int((p != 0).sum()) for p in prunable) == sum(int(m.sum()) for m in masks)
    x, _ = load_digits_tensors()
    model.eval()
    recalibrate_batchnorm(model, [x[:256], x[256:512]])
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        h = model[0](x[:512])
    torch.testing.assert_close(model[1].running_mean, h.mean(0), rtol=1e-4, atol=1e-5)


# --- the callback inside Lightning -------------------------------------------------------------------

def _sixteen_mixed():
    """16-mixed with a GradScaler on CPU (Lightning itself turns precision='16-mixed' into bf16 on CPU, so the
    plugin is given directly: the same plugin class and scaler logic as on CUDA)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}


def _fit_cram(callbacks=None, model_class=None, max_steps=4, **trainer_kwargs):
    import lightning.pytorch as pl

    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    class Counting(model_class or MLPClassifier):
        calls = 0

        def training_step(self, batch, batch_idx):
            Counting.calls += 1
            return super().training_step(batch, batch_idx)

    pl.seed_everything(0, verbose=False)
    model = Counting(hidden=[32], batch_norm=True, lr=1e-2)
    defaults = dict(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                    enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0)
    trainer = pl.Trainer(callbacks=[CrAMCallback(rho=0.05)] if callbacks is None else callbacks,
                         **{**defaults, **trainer_kwargs})
    trainer.fit(model, datamodule=DigitsDataModule())
    return trainer, Counting.calls


def _weights(trainer) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in trainer.lightning_module.parameters()])


@pytest.mark.parametrize("setting", ["32-true", "bf16-mixed", "16-mixed", "accumulate-2"])
def test_callback_runs_two_passes_over_every_micro_batch(setting):
    kwargs = {"32-true": {}, "bf16-mixed": {"precision": "bf16-mixed"}, "16-mixed": _sixteen_mixed(),
              "accumulate-2": {"accumulate_grad_batches": 2}}[setting]
    trainer, calls = _fit_cram(**kwargs)
    micro_batches = 4 * trainer.accumulate_grad_batches
    assert isinstance(trainer.optimizers[0], CrAM) and trainer.global_step == 4 and calls == 2 * micro_batches


def test_callback_steps_as_the_optimizer_on_its_closure_path():
    """The callback's passes (pass 2 replayed through the strategy in on_before_optimizer_step) compute what
    the optimizer computes alone with Lightning's closure (both passes inside ``step``); a run without CrAM is
    far from both, so the comparison can fail."""
    from lightning_ext.models import MLPClassifier

    class OwnCrAM(MLPClassifier):  # CrAM configured by the module itself, driven by the closure
        def configure_optimizers(self):
            bn = [m for m in self.modules() if isinstance(m, nn.BatchNorm1d)]
            return CrAM(super().configure_optimizers(), model=self, batchnorm=bn, rho=0.05)

    driven, _ = _fit_cram()
    closure, _ = _fit_cram(callbacks=[], model_class=OwnCrAM)
    plain, _ = _fit_cram(callbacks=[])
    assert not closure.optimizers[0].driven and driven.optimizers[0].driven
    assert (_weights(driven) - _weights(closure)).abs().max() < 1e-6
    assert (_weights(driven) - _weights(plain)).abs().max() > 1e-2


def test_16_mixed_is_close_to_fp32_and_an_overflow_in_pass_two_skips_the_step():
    from lightning_ext.models import MLPClassifier

    fp32, _ = _fit_cram()
    half, _ = _fit_cram(**_sixteen_mixed())
    plain, _ = _fit_cram(callbacks=[], **_sixteen_mixed())
    close, far = (_weights(half) - _weights(fp32)).abs().max(), (_weights(plain) - _weights(fp32)).abs().max()
    assert close < 0.1 * far, (close, far)

    class OverflowsInPassTwo(MLPClassifier):  # the second step's pass 2 overflows, its pass 1 does not
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            replaying = any(getattr(c, "_replaying", False) for c in self.trainer.callbacks)
            if replaying and self.trainer.global_step == 1:
                out = {**out, "loss": out["loss"] * float("inf")} if isinstance(out, dict) else out * float("inf")
            return out

    one, _ = _fit_cram(max_steps=1, **_sixteen_mixed())
    skipped, _ = _fit_cram(max_steps=2, model_class=OverflowsInPassTwo, **_sixteen_mixed())
    assert torch.equal(_weights(skipped), _weights(one))  # the step was skipped, no NaN reached the weights
    assert skipped.precision_plugin.scaler.get_scale() == one.precision_plugin.scaler.get_scale() / 2


@pytest.mark.parametrize("order", ["cram-first", "lawn-first"])
def test_lawn_and_cram_stack_in_either_order_with_one_result(order):
    """CrAM's pass 2 runs before any optimizer step, so wrapping LAWN or being wrapped by it is the same step
    (LAWN's projection and re-scaling act on CrAM's gradient either way)."""
    from lightning_ext.callbacks import LAWN

    def callbacks(first_cram: bool):
        pair = [CrAMCallback(rho=0.05), LAWN(free_steps=2, layers=["net.3"])]
        return pair if first_cram else pair[::-1]

    ran, _ = _fit_cram(callbacks=callbacks(order == "cram-first"))
    other, _ = _fit_cram(callbacks=callbacks(order != "cram-first"))
    cram_only, _ = _fit_cram()
    assert (_weights(ran) - _weights(other)).abs().max() < 1e-7
    assert (_weights(ran) - _weights(cram_only)).abs().max() > 1e-3


def test_callback_refuses_unsupported_combinations():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(RuntimeError, match=r"CrAM with precision='bf16-true'"):
        _fit_cram(precision="bf16-true")
    trainer = SimpleNamespace(strategy=FSDPStrategy(), precision="32-true", accumulate_grad_batches=1)
    with pytest.raises(RuntimeError, match=r"CrAM with FSDP1 \(FSDPStrategy\).*fsdp_cpu"):
        CrAMCallback()._refuse_unsupported(trainer, SimpleNamespace(automatic_optimization=True))


def test_callback_refuses_manual_optimization():
    import lightning.pytorch as pl

    from lightning_ext.callbacks import CrAM as CrAMCallback
    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    class Manual(MLPClassifier):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[CrAMCallback()])
    with pytest.raises(RuntimeError, match="CrAM with manual optimization"):
        trainer.fit(Manual(), datamodule=DigitsDataModule())


def test_wraps_a_bitsandbytes_8bit_optimizer():
    """bitsandbytes' 8-bit AdamW (CPU) as CrAM's base: the same steps as the transcription fed to the
    same 8-bit optimizer, and not what the 8-bit optimizer alone does."""
    bnb = pytest.importorskip("bitsandbytes")

    def model():
        torch.manual_seed(0)  # 64 x 128 = 8192 weights: above bitsandbytes' 4096 threshold for 8-bit state
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).float()

    def adamw8bit(params):
        return bnb.optim.AdamW8bit(params, lr=1e-3)

    ours, opt = run_cram(model(), make_opt=adamw8bit, dtype=torch.float32, rho=0.05, sparsities=[0.7], plus=True)
    assert opt.base.state[ours[0].weight]["state1"].dtype == torch.uint8  # the 8-bit path ran
    ref = transcription(model(), rho=0.05, sparsity=0.7, plus=True, sparse_grad=True, make_opt=adamw8bit,
                        dtype=torch.float32)
    assert max_diff(ours, ref) <= 1e-6
    plain = model()
    base = adamw8bit(plain.parameters())
    for x, y in digits_batches(STEPS, dtype=torch.float32):
        closure_for(plain, base, x, y)()
        base.step()
    assert max_diff(ours, plain) > 1e-3


@pytest.mark.parametrize("path", ["kernel", "aten"])
@pytest.mark.parametrize("case", ["normal", "ties", "sorted", "reversed", "tiny-k", "all-k"])
def test_kth_smallest_equals_kthvalue(case, path, monkeypatch):
    from lightning_ext.nn import pruning
    from lightning_ext.nn.pruning import kth_smallest

    if path == "aten":
        monkeypatch.setenv("LIGHTNING_EXT_SELECT_KERNEL", "0")
    else:
        assert pruning._select_kernel(torch.zeros(3)) is not None  # the C++ kernel built here
    g = torch.Generator().manual_seed(0)
    n = 600_000
    values = {"normal": torch.randn(n, generator=g).abs(),
              "ties": torch.randint(0, 50, (n,), generator=g).float(),
              "sorted": torch.arange(n, dtype=torch.float32),
              "reversed": torch.arange(n, 0, -1, dtype=torch.float32),
              "tiny-k": torch.rand(n, generator=g), "all-k": torch.rand(n, generator=g)}[case]
    ks = {"tiny-k": [1, 2, 17], "all-k": [n, n - 1]}.get(case, [n // 10, n // 2, int(n * 0.9), int(n * 0.95)])
    for k in ks:
        assert torch.equal(kth_smallest(values, k), torch.kthvalue(values, k).values), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_bracket_kernel_counts_and_gathers_as_aten(dtype):
    """The one-pass C++ bracket (AVX-512 for float32/float64 where the CPU has it, scalar otherwise, and for the
    tail) equals ATen's lt / le / boolean indexing, NaN included (neither below nor inside), in order."""
    from lightning_ext.nn.pruning import _select_kernel

    g = torch.Generator().manual_seed(1)
    values = torch.randn(100_003, generator=g).abs().to(dtype)  # not a multiple of 16 or 8: the scalar tail runs
    values[::97] = values[11]  # ties at the bracket's edge
    values[5::1013] = float("nan")
    kernel = _select_kernel(values)
    for lo, hi in ((values[11], values[11]), (values[11], values[11] * 2), (values.new_tensor(0.0), values[11])):
        below, inside = kernel.bracket_gather(values, lo, hi)
        assert below == int((values < lo).sum())
        assert torch.equal(inside, values[(values >= lo) & (values <= hi)]), (lo, hi)
        assert inside.dtype == dtype
