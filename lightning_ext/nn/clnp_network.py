"""The network-level steps of CLNP (Golkar, Kagan, Cho 2019, arXiv 1903.04476), plain torch: which layers form
the pruned chain, giving free neurons to a new task, and the end-of-task pruning — activity on validation data,
the threshold search (:func:`lightning_ext.nn.clnp.threshold_search`), allocation and freezing — with the
capacity table. The layer is :class:`lightning_ext.nn.clnp.CLNPLinear`; :class:`lightning_ext.callbacks.CLNP`
calls these from Lightning's hooks.

Contract of the pruning measurement: ``loader`` yields ``(x, y, task)`` batches and ``model(x, task)`` returns
logits (:class:`lightning_ext.models.ContinualMLP` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_ext.nn.clnp import FREE, CLNPLinear, check_no_normalization, threshold_search
from lightning_ext.surgery import (SurgeryError, describe_modules, gathered_parameters, replace_modules,
                                   technique_of)

__all__ = ["CLNPNetwork"]


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


class CLNPNetwork:
    """The hidden chain ``layers`` (in forward order) and the per-task ``heads`` of one model, all CLNP layers."""

    def __init__(self, layers: Sequence[CLNPLinear], heads: Sequence[CLNPLinear]) -> None:
        self.layers, self.heads = list(layers), list(heads)
        self.sync_inputs()

    @classmethod
    def convert(cls, model: nn.Module, layer_names: Sequence[str] | None, heads_name: str) -> CLNPNetwork:
        """Make ``layer_names`` (default: every ``nn.Linear`` outside ``heads_name``) and each head of the
        ``heads_name`` ``ModuleList`` CLNP layers, in place (idempotent; original parameters kept)."""
        heads = model.get_submodule(heads_name) if _has(model, heads_name) else None
        if not isinstance(heads, nn.ModuleList) or not all(isinstance(h, nn.Linear) for h in heads):
            raise SurgeryError(f"CLNP: heads={heads_name!r} must name an nn.ModuleList of nn.Linear heads, "
                               f"one per task. Modules that exist:\n{describe_modules(model)}")
        names = layer_names
        if names is None:
            names = [n for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and not (n == heads_name or n.startswith(heads_name + "."))]
        if not names:
            raise SurgeryError("CLNP: no hidden nn.Linear layers found. Modules that exist:\n"
                               f"{describe_modules(model)}")
        if layer_names is None:  # a layer another technique installed that is not an nn.Linear: not in the chain
            foreign = [(n, technique_of(m)) for n, m in model.named_modules()
                       if technique_of(m) not in (None, "CLNP") and not isinstance(m, nn.Linear)
                       and ".parametrizations." not in f".{n}."  # a reparameterized Linear is one, refused below
                       and not (n == heads_name or n.startswith(heads_name + "."))]
            if foreign:
                name, owner = foreign[0]
                raise SurgeryError(f"CLNP and {owner} do not compose: {name!r} is a {owner} layer "
                                   f"({type(model.get_submodule(name)).__name__}), not an nn.Linear, so CLNP would "
                                   "leave its neurons unpruned and unfrozen between tasks. Name CLNP's layers "
                                   "(layers=...) or exclude it from one of them; model left unchanged")
        adapted = _adapter_layer(model, names)
        if adapted is not None:
            name, adapter = adapted
            raise SurgeryError(f"CLNP and {adapter} do not compose: CLNP prunes and freezes the neurons of the "
                               f"network's Linear layers, and {adapter} has wrapped {name!r} in an adapter layer "
                               "(its low-rank factors would read as layers of the chain). Train the adapter and "
                               "CLNP in separate fits, or name CLNP's layers (layers=...) outside the adapter's "
                               "targets (model left unchanged)")
        check_no_normalization(model, names)
        layers = [model.get_submodule(n) if _has(model, n) else None for n in names]
        missing = [n for n, m in zip(names, layers) if not isinstance(m, nn.Linear)]
        if missing:
            raise SurgeryError(f"CLNP: layers {missing} are not nn.Linear modules of the model. Modules that "
                               f"exist:\n{describe_modules(model)}")
        for a, b, name in zip(layers[:-1], layers[1:], names[1:]):
            if b.in_features != a.out_features:
                raise ValueError(f"CLNP: layers must form a chain; {name!r} reads {b.in_features} features but the "
                                 f"previous layer has {a.out_features} neurons")
        if any(h.in_features != layers[-1].out_features for h in heads):
            raise ValueError(f"CLNP: every head must read the last layer's {layers[-1].out_features} neurons")
        todo = [n for n, m in zip(names, layers) if not isinstance(m, CLNPLinear)]
        if todo:
            replace_modules(model, todo, lambda _, old: CLNPLinear.from_linear(old),
                            technique="CLNP")
        for i, head in enumerate(heads):
            if not isinstance(head, CLNPLinear):
                heads[i] = CLNPLinear.from_linear(head, row_alloc=i)
        return cls([model.get_submodule(n) for n in names], list(heads))

    @torch.no_grad()
    def sync_inputs(self) -> None:
        """Each layer's input allocations are the previous layer's neuron allocations."""
        for prev, layer in zip(self.layers[:-1], self.layers[1:]):
            layer.in_alloc.copy_(prev.alloc)
        for head in self.heads:
            head.in_alloc.copy_(self.layers[-1].alloc)
        for layer in [*self.layers, *self.heads]:
            layer.refresh()

    @torch.no_grad()
    def begin_task(self, task: int, seed: int) -> None:
        """Give every free neuron to ``task`` and re-initialise it (seeded by ``seed``, ``task`` and the layer:
        identical on every rank)."""
        for index, layer in enumerate(self.layers):
            free = layer.alloc == FREE
            layer.alloc[free] = task
            generator = torch.Generator().manual_seed(seed * 1_000_003 + task * 1_009 + index)
            with gathered_parameters(layer, modifier_rank=0):
                layer.reinit_rows(free.cpu(), generator)
        self.sync_inputs()

    def weight_l1(self) -> list[torch.Tensor]:
        """L1 norm of each layer's trainable rows (index_select of the rows: no host sync, unlike a bool mask)."""
        return [layer.weight.index_select(0, layer._train_idx).abs().sum() for layer in self.layers]

    @torch.no_grad()
    def prune_and_commit(self, model: nn.Module, loader: Iterable, task: int, margin: float,
                         device: torch.device, on_pass: Callable[[], None] | None = None) -> dict[str, Any]:
        """Measure each candidate neuron's mean ReLU activity on ``loader``, keep the fewest whose validation
        accuracy stays within ``margin`` of the unpruned network, give them to ``task`` and freeze them with head
        ``task``; pruned neurons return to the free pool. Returns the accuracies and the threshold."""
        was_training = model.training
        model.eval()
        candidates = [(layer.alloc == task) & ~layer.frozen for layer in self.layers]
        sums = [torch.zeros(layer.out_features, dtype=torch.float64) for layer in self.layers]
        count = [0]

        def record(layer: CLNPLinear, out: torch.Tensor) -> None:
            sums[self.layers.index(layer)] += torch.relu(out.detach()).flatten(0, -2).sum(0).double().cpu()

        def accuracy(collect: bool = False) -> float:
            correct = total = 0
            for layer in self.layers:
                layer.activity_hook = record if collect else None
            for x, y, t in loader:
                x, y = x.to(device), y.to(device)
                logits = model(x, int(t[0]))
                if not torch.isfinite(logits).all():
                    raise FloatingPointError("CLNP: non-finite outputs; zero forgetting needs finite activations")
                correct += int((logits.argmax(-1) == y).sum())
                total += len(y)
                if collect:
                    count[0] += len(y)
            for layer in self.layers:
                layer.activity_hook = None
            if on_pass is not None:  # one pass over the validation data done (a progress bar counts them)
                on_pass()
            return correct / max(total, 1)

        full = accuracy(collect=True)
        activity = torch.cat([(s / max(count[0], 1))[c.cpu()] for s, c in zip(sums, candidates)])

        def set_kept(keep: torch.Tensor) -> None:
            offset = 0
            for layer, cand in zip(self.layers, candidates):
                n = int(cand.sum())
                alloc = torch.where(cand, torch.tensor(task, dtype=layer.alloc.dtype, device=cand.device), layer.alloc)
                dropped = torch.zeros_like(cand)
                dropped[cand.nonzero().flatten()] = ~keep[offset:offset + n].to(cand.device)
                layer.alloc.copy_(torch.where(dropped, torch.tensor(FREE, dtype=layer.alloc.dtype, device=cand.device),
                                              alloc))
                offset += n
            self.sync_inputs()

        def accuracy_if_kept(keep: torch.Tensor) -> float:
            set_kept(keep)
            return accuracy()

        if activity.numel() > 1:
            keep, threshold, pruned_acc = threshold_search(activity, accuracy_if_kept, full, margin)
        else:
            keep, threshold, pruned_acc = torch.ones_like(activity, dtype=torch.bool), -math.inf, full
        set_kept(keep)
        for layer in self.layers:
            with gathered_parameters(layer):
                layer.freeze_rows((layer.alloc == task) & ~layer.frozen)
        head = self.heads[task]
        with gathered_parameters(head):
            head.freeze_rows(torch.ones(head.out_features, dtype=torch.bool, device=head.frozen_rows.device))
        model.train(was_training)
        return {"task": task, "val_acc_before": full, "val_acc_after": pruned_acc, "threshold": threshold}

    def capacity(self, task: int, reuse_threshold: float) -> list[dict[str, int]]:
        """Per layer: neurons allocated to ``task`` (new), old neurons its rows read (reused: a weight above
        ``reuse_threshold`` × the mean |weight| of the new rows), free ones."""
        rows = []
        consumers = [*self.layers[1:], self.heads[task]]
        for layer, consumer in zip(self.layers, consumers):
            new_rows = (consumer.alloc == task) & consumer.frozen  # just frozen: their values are in the buffers
            weights = (consumer.frozen_weight * consumer.allowed())[new_rows].abs()
            old = (consumer.in_alloc >= 0) & (consumer.in_alloc < task)
            cutoff = reuse_threshold * weights[weights > 0].mean() if (weights > 0).any() else math.inf
            reused = int(((weights > cutoff).any(0) & old).sum()) if new_rows.any() else 0
            rows.append({"new": int((layer.alloc == task).sum()), "reused": reused,
                         "free": int((layer.alloc == FREE).sum())})
        return rows


def _adapter_layer(model: nn.Module, names: Sequence[str]) -> tuple[str, str] | None:
    """The first module a peft adapter installed that holds one of ``names``, with the adapter's name (``LoRA``
    for peft's lora layers, else the tuner's package name), or ``None``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and any(n == name or n.startswith(name + ".") for n in names):
            tuner = type(module).__module__.split(".")[2] if type(module).__module__.startswith("peft.tuners.") \
                else type(module).__name__
            return name, {"lora": "LoRA", "miss": "Bone"}.get(tuner, tuner)
    return None
