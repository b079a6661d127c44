"""CLNP (Golkar et al., 2019): exact zero forgetting, the connection rule, freezing in the forward pass,
the task sequence across processes, clear refusals."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_ext.callbacks import CLNP
from lightning_ext.continual import fit_task_sequence
from lightning_ext.data import SplitDigitsDataModule
from lightning_ext.models import ContinualMLP
from lightning_ext.nn.clnp import FREE, CLNPLinear, activity_l1, threshold_search

TASKS = 3
EPOCHS = 15
SCRIPTS = Path(__file__).resolve().parent / "scripts"


class DecayedMLP(ContinualMLP):
    """AdamW with weight decay: frozen rows must not move although decay acts on every parameter."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1)


def trainer_for(clnp: CLNP, epochs: int = EPOCHS, **kw) -> pl.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                    check_val_every_n_epoch=10_000, deterministic=True)
    return pl.Trainer(callbacks=[clnp], **{**settings, **kw})


def test_logits(model: ContinualMLP, task: int, device: str = "cpu") -> torch.Tensor:
    x = SplitDigitsDataModule(task=task).splits(task)["test"].tensors[0].to(device)
    was = model.training
    model.eval().to(device)
    with torch.no_grad():
        out = model(x, task)
    model.train(was).cpu()
    return out


test_logits.__test__ = False  # a helper, not a test


def run_sequence(tasks: int = TASKS, l1: float = 1e-3, num_tasks: int | None = None, device: str = "cpu",
                 **clnp_kw):
    """``device``: where the tasks train and where old logits are recomputed and compared."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    pl.seed_everything(0, verbose=False)
    model = DecayedMLP(hidden=[64, 64], num_tasks=num_tasks or tasks)
    clnp = CLNP(l1=l1, **clnp_kw)
    snapshots: dict[int, torch.Tensor] = {}
    drifts: list[tuple[int, int]] = []

    def after(task, m):
        snapshots[task] = test_logits(m, task, device)
        drifts.extend((old, task) for old in range(task)
                      if old in snapshots and not torch.equal(snapshots[old], test_logits(m, old, device)))

    fit_task_sequence(model, [SplitDigitsDataModule(task=t) for t in range(tasks)],
                      lambda t: trainer_for(clnp, accelerator=device), clnp, after_task=after)
    return model, clnp, drifts


@pytest.mark.parametrize("path", ["in-place fast path", "W_eff path"])
def test_zero_forgetting_is_exact(path, monkeypatch):
    monkeypatch.setattr(CLNPLinear, "fast_path_min_numel", 0 if path == "in-place fast path" else 1 << 62)
    model, clnp, drifts = run_sequence()
    assert drifts == []  # every earlier head's logits torch.equal after every later task
    assert clnp.state["finished"] == TASKS and len(clnp.state["history"]) == TASKS
    frees = [[row["free"] for row in h["layers"]] for h in clnp.state["history"]]
    assert all(a >= b for prev, cur in zip(frees, frees[1:]) for a, b in zip(prev, cur))  # capacity only shrinks
    assert all(h["val_acc_after"] >= h["val_acc_before"] - 0.015 for h in clnp.state["history"])


def test_forgetting_returns_without_the_frozen_rows(monkeypatch):
    """The same sequence with freezing switched off (trainable weights used for every row): old outputs drift."""
    def unfrozen_forward(self, x):
        out = torch.nn.functional.linear(x, self.weight * self.allowed(), self.bias)
        if self.activity_hook is not None:
            self.activity_hook(self, out)
        return out

    monkeypatch.setattr(CLNPLinear, "forward", unfrozen_forward)
    _, _, drifts = run_sequence()
    assert drifts


def _half_frozen_layer(seed=0):
    torch.manual_seed(seed)
    layer = CLNPLinear.from_linear(torch.nn.Linear(12, 10).double())
    with torch.no_grad():
        layer.alloc[:4], layer.alloc[4:] = 0, 1
        layer.freeze_rows(torch.arange(10) < 4)
        layer.weight.add_(torch.randn_like(layer.weight))  # what weight decay / momentum would do to frozen rows
        layer.bias.add_(1.0)
    return layer


def test_fast_path_equals_general_path(monkeypatch):
    """The in-place fast path gives the W_eff path's outputs and gradients (frozen rows: zero), also when the
    layer is called twice in one graph, and ignores whatever the optimizer did to the frozen rows."""
    monkeypatch.setattr(CLNPLinear, "fast_path_min_numel", 0)
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    results = []
    for fast in (True, False):
        layer = _half_frozen_layer()
        assert layer._use_fast_path()
        layer._use_fast_path = (lambda: fast)
        xin = x.clone().requires_grad_()
        out = layer(xin) + 0.5 * layer(torch.tanh(xin))
        out.pow(2).sum().backward()
        results.append((out.detach(), xin.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(results[0][2][:4], torch.zeros_like(results[0][2][:4]))
    assert torch.equal(results[0][3][:4], torch.zeros_like(results[0][3][:4]))
    assert results[0][2][4:].abs().sum() > 0


def test_fast_path_uses_frozen_values_after_every_step(monkeypatch):
    monkeypatch.setattr(CLNPLinear, "fast_path_min_numel", 0)
    layer = _half_frozen_layer()
    x = torch.randn(6, 12, dtype=torch.float64)
    reference = layer.frozen_weight[:4] @ x.t() + layer.frozen_bias[:4, None]
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.5)
    for _ in range(3):
        out = layer(x)
        torch.testing.assert_close(out[:, :4].t(), reference, rtol=1e-12, atol=1e-12)
        out.sum().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(layer.weight[:4], layer.frozen_weight[:4])  # decay moved the unused copies again
    first = layer(x)[:, :4]
    with torch.no_grad():
        layer.weight[:4] += 1.0  # in place while `first`'s graph is pending: restored again
    assert torch.equal(layer(x)[:, :4], first)  # bit-identical whatever the trainable copies hold


def test_activity_penalty_counts_the_trainable_rows_only():
    layer = _half_frozen_layer()  # rows 0-3 frozen
    out = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    value = activity_l1(out, layer.train_rows)
    torch.testing.assert_close(value, torch.relu(out)[..., 4:].sum(), rtol=1e-14, atol=0)
    value.backward()
    expected = torch.cat([torch.zeros_like(out[..., :4]), (out[..., 4:] > 0).to(out.dtype)], -1)
    assert torch.equal(out.grad, expected)


@pytest.mark.parametrize("l1, l1_on", [(0.0, "activations"), (0.5, "activations"), (0.5, "weights"),
                                        (0.5, "both")])
def test_training_step_adds_l1_times_the_mean_activity(l1, l1_on):
    torch.manual_seed(0)
    model = ContinualMLP(hidden=[16, 16], num_tasks=2)
    model.log = lambda *args, **kwargs: None
    clnp = CLNP(l1=l1, l1_on=l1_on)
    clnp.prepare(model)
    with torch.no_grad():
        for layer in clnp.layers:
            layer.alloc[:8], layer.alloc[8:] = 0, 1
            layer.freeze_rows(torch.arange(16) < 8)
        clnp._sync_inputs()
    clnp._current = 1
    clnp._install(model)
    x, y = torch.rand(5, 64), torch.randint(0, 2, (5,))
    loss = model.training_step((x, y, torch.full((5,), 1)), 0)["loss"]
    first, second = clnp.layers
    h1 = torch.nn.functional.linear(x, first.effective_weight(), first.effective_bias())
    h2 = torch.nn.functional.linear(torch.relu(h1), second.effective_weight(), second.effective_bias())
    expected = torch.nn.functional.cross_entropy(model.heads[1](torch.relu(h2)), y)
    if l1_on in ("activations", "both"):
        expected = expected + l1 * (torch.relu(h1)[:, 8:].sum() + torch.relu(h2)[:, 8:].sum()) / 5
    if l1_on in ("weights", "both"):
        expected = expected + l1 * (first.weight[8:].abs().sum() + second.weight[8:].abs().sum())
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    hooked = l1 > 0 and l1_on != "weights"
    assert all((layer.activity_hook is not None) == hooked for layer in clnp.layers)


def test_connection_rule_and_frozen_rows():
    model, clnp, _ = run_sequence(tasks=2)
    for layer in [*clnp.layers, *clnp.heads]:
        w = layer.effective_weight()
        reads = w != 0
        a_out, a_in = layer.alloc.long(), layer.in_alloc.long()
        assert not (reads & (a_in.unsqueeze(0) > a_out.unsqueeze(1))).any()  # nobody reads a later neuron
        assert torch.equal(w[layer.frozen], layer.frozen_weight[layer.frozen] * layer.allowed()[layer.frozen])
    assert all(bool(h.frozen.all()) for h in clnp.heads)
    assert all((l.alloc == FREE).any() for l in clnp.layers)  # capacity left for later tasks


def test_sequence_resumes_across_processes_from_checkpoint_dir(tmp_path):
    straight, _, _ = run_sequence(tasks=3, checkpoint_dir=str(tmp_path / "a"))
    # "process 1" runs tasks 0 and 1; "process 2" (fresh objects) finds them on disk and runs task 2
    run_sequence(tasks=2, num_tasks=3, checkpoint_dir=str(tmp_path / "b"))
    resumed, clnp, drifts = run_sequence(tasks=3, checkpoint_dir=str(tmp_path / "b"))
    assert drifts == [] and clnp.state["finished"] == 3 and len(clnp.state["history"]) == 3
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_threshold_search_keeps_the_largest_passing_prune():
    activity = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.05])
    # accuracy drops once the neuron with activity 0.3 is pruned
    keep, threshold, acc = threshold_search(activity, lambda keep: 1.0 if keep[3] else 0.5, 1.0, 0.01)
    assert keep.tolist() == [True, False, True, True, False] and threshold == pytest.approx(0.1) and acc == 1.0


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="l1_on must be one of"):
        CLNP(l1_on="grads")
    with pytest.raises(ValueError, match=r"margin must be a number in \[0.0, 1.0\]"):
        CLNP(margin=2.0)
    bn = ContinualMLP(hidden=[8])
    bn.net.insert(1, nn.BatchNorm1d(8))
    with pytest.raises(ValueError, match="normalisation layers.*BatchNorm1d"):
        CLNP().prepare(bn)
    with pytest.raises(ValueError, match="heads='head'"):
        CLNP(heads="head").prepare(ContinualMLP(hidden=[8]))
    clnp = CLNP()
    with pytest.raises(ValueError, match="tasks run in order.*next task is 0, not 1"):
        trainer_for(clnp, epochs=1).fit(ContinualMLP(hidden=[8]), datamodule=SplitDigitsDataModule(task=1))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_frozen_rows_stay_frozen_under_deepspeed(stage, tmp_path):
    """Task 0 here; task 1 under DeepSpeed ZeRO (2 processes, AdamW with weight decay): task 0's outputs
    are bit-identical afterwards, and task 1 trained."""
    pytest.importorskip("deepspeed")
    tasks = tmp_path / "tasks"
    pl.seed_everything(0, verbose=False)
    model = DecayedMLP(hidden=[32, 32], num_tasks=2)
    trainer_for(CLNP(l1=1e-3, checkpoint_dir=str(tasks)), epochs=3).fit(
        model, datamodule=SplitDigitsDataModule(task=0, batch_size=8))
    before = test_logits(model, 0)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "clnp_deepspeed.py"), str(tasks),
                           f"deepspeed_cpu_stage_{stage}"], cwd=tmp_path, capture_output=True, text=True, timeout=480)
    errors = "".join(e.read_text() for e in tasks.glob("error*.txt"))
    assert proc.returncode == 0 and not errors, proc.stdout[-2000:] + proc.stderr[-2000:] + errors
    after = DecayedMLP(hidden=[32, 32], num_tasks=2)
    CLNP().prepare(after)
    saved = torch.load(tasks / "task1.pt", weights_only=True)
    after.load_state_dict(saved["state_dict"])
    assert saved["clnp"]["finished"] == 2
    assert torch.equal(before, test_logits(after, 0))
    assert not torch.equal(after.heads[1].frozen_weight, torch.zeros_like(after.heads[1].frozen_weight))
