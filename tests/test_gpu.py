"""CUDA-only paths (run on a lent GPU machine; skipped cleanly without CUDA)."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch

from lightning_ext.data import StdlibCharDataModule
from lightning_ext.models import CharLlama


def _train_char_llama(precision: str, tmp_path) -> tuple[float, float, set]:
    """300 steps of the demo model on CUDA; val bpc before and after, and the (device, dtype) of every
    ``nn.Linear`` output while training (teardown moves the model back to the CPU)."""
    pl.seed_everything(0, verbose=False)
    data = StdlibCharDataModule(seq_len=128, batch_size=32, train_chars=500_000, val_chars=32_768)
    model = CharLlama(lr=3e-3)
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: seen.add((out.device.type, out.dtype))
                                         if m.training else None)
    trainer = pl.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=300, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=4,
                         default_root_dir=tmp_path)
    before = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    trainer.fit(model, datamodule=data)
    after = trainer.validate(model, datamodule=data, verbose=False)[0]["val/bpc"]
    return before, after, seen


@pytest.mark.gpu
def test_char_llama_learns_on_cuda_in_bf16(tmp_path):
    """bf16-mixed on CUDA learns as float32 does (H200, 300 steps: 7.04 -> 4.74 bf16, 4.70 fp32 bpc)."""
    before, after, seen = _train_char_llama("bf16-mixed", tmp_path)
    _, after_fp32, seen_fp32 = _train_char_llama("32-true", tmp_path)
    assert seen == {("cuda", torch.bfloat16)} and seen_fp32 == {("cuda", torch.float32)}
    assert after < before - 2.0, (before, after)
    assert abs(after - after_fp32) < 0.15, (after, after_fp32)


@pytest.mark.gpu
def test_deepspeed_cpu_strategy_keeps_lightnings_cuda_path():
    """On a CUDA accelerator the subclass must behave as Lightning's own DeepSpeed strategy."""
    pytest.importorskip("deepspeed")
    from lightning_ext.strategies import DeepSpeedCPUStrategy

    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=DeepSpeedCPUStrategy(stage=2), logger=False)
    assert trainer.strategy.root_device.type == "cuda" and torch.cuda.is_available()


@pytest.mark.gpu
def test_cram_trains_under_16_mixed_on_cuda():
    """CrAM under CUDA 16-mixed (Lightning's GradScaler path, which calls the closure once): two passes per step
    and weights close to the fp32 run, far closer than plain SGD's."""
    from lightning_ext.callbacks import CrAM
    from lightning_ext.data import DigitsDataModule
    from lightning_ext.models import MLPClassifier

    def run(precision: str, cram: bool) -> torch.Tensor:
        pl.seed_everything(0, verbose=False)
        model = MLPClassifier(hidden=[32], batch_norm=True, lr=1e-2)
        trainer = pl.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=4, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                             callbacks=[CrAM(rho=0.05)] if cram else [])
        trainer.fit(model, datamodule=DigitsDataModule())
        return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])

    fp32, half, plain = run("32-true", True), run("16-mixed", True), run("16-mixed", False)
    assert (half - fp32).abs().max() < 0.1 * (plain - fp32).abs().max()


@pytest.mark.gpu
def test_clnp_zero_forgetting_is_exact_on_cuda(monkeypatch):
    """Tasks trained on the GPU (in-place fast path, cuBLAS); every old head's logits recomputed on the GPU
    after every later task are torch.equal to those taken when it finished."""
    from test_clnp import run_sequence

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # Trainer(deterministic=True) on CUDA
    _, clnp, drifts = run_sequence(device="cuda")
    assert drifts == [] and clnp.state["finished"] == 3
    assert all(h["val_acc_after"] >= h["val_acc_before"] - 0.015 for h in clnp.state["history"])


@pytest.mark.gpu
def test_quest_linear_on_cuda_matches_cpu():
    """The lazily built Hadamard and the quantizer on CUDA: float64 forward and gradients equal the CPU's;
    the integer export equals the fake quant; bf16 autocast stays within 8 % (relative Frobenius;
    rounding flips near the 4-bit grid points: 3.5 % on CPU)."""
    from lightning_ext.nn.quest import QuestLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64).double()
    x = torch.randn(32, 256, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        layer = QuestLinear.from_linear(copy.deepcopy(lin).to(device), weight_bits=4, act_bits=4)
        xin = x.detach().to(device).requires_grad_()
        out = layer(xin)
        out.pow(2).sum().backward()
        results[device] = [t.detach().cpu() for t in (out, xin.grad, layer.weight.grad)]
    for ref, got in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        exported = layer.export()(xin.detach()).cpu()
        layer_f = QuestLinear.from_linear(copy.deepcopy(lin).float().cuda(), weight_bits=4, act_bits=4)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = layer_f(xin.detach().float()).double().cpu()
    torch.testing.assert_close(exported, results["cuda"][0], rtol=1e-10, atol=1e-10)
    ref = results["cpu"][0]
    assert float((low - ref).norm() / ref.norm()) < 0.08


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["AdamP", "SGDP", "FAdam"])
def test_foreach_optimizers_on_cuda_equal_single_tensor(name):
    from lightning_ext.optimizers import SGDP, AdamP, FAdam

    make = {"AdamP": lambda p, fe: AdamP(p, lr=3e-3, weight_decay=1e-2, foreach=fe),
            "SGDP": lambda p, fe: SGDP(p, lr=0.05, momentum=0.9, weight_decay=1e-3, foreach=fe),
            "FAdam": lambda p, fe: FAdam(p, lr=1e-3, foreach=fe)}[name]
    finals = []
    for foreach in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
        initial = torch.cat([p.detach().flatten() for p in net.parameters()])
        opt = make(net.parameters(), foreach)
        for step in range(20):
            g = torch.Generator(device="cuda").manual_seed(step)
            x = torch.randn(16, 32, device="cuda", generator=g)
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
        finals.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(finals[0], initial)

