"""``CLNP``: continual learning via neural pruning (Golkar, Kagan, Cho 2019, arXiv 1903.04476) as a
Lightning callback. One ``trainer.fit`` is one task; the layer and the search are in
:mod:`lightning_ext.nn.clnp`, the network-level steps (conversion, a new task, the end-of-task pruning) in
:mod:`lightning_ext.nn.clnp_network`; this file is the Lightning glue.

Per task ``t`` (from the ``task`` argument, else ``trainer.datamodule.task``):

* ``setup``: the chain of ``layers`` (``nn.Linear``, in forward order) and every head of the ``heads``
  ``ModuleList`` become :class:`~lightning_ext.nn.clnp.CLNPLinear` (idempotent; original parameters
  kept). Free neurons are given to task ``t`` and re-initialised (seeded by ``seed`` and ``t``:
  identical on every rank). With ``checkpoint_dir``, the previous task's file is loaded first.
* training: only head ``t`` has ``requires_grad``; ``training_step`` is wrapped to add ``l1 * penalty``
  to the loss — the mean over the batch
  of the summed ReLU activity of task ``t``'s (trainable) neurons (``l1_on="activations"``), or the L1
  norm of their weights (``"weights"``), or both.
* ``on_fit_end``: on the validation set (``datamodule.val_dataloader()``, the whole set on every rank,
  so all ranks decide alike) the mean ReLU activity of each candidate neuron is measured, and the
  largest activity threshold whose pruning keeps validation accuracy within ``margin`` of the unpruned
  network is found by binary search (graceful forgetting). Survivors stay with task ``t`` and are
  frozen with head ``t``; pruned neurons return to the free pool. A table of new / reused / free
  neurons per layer is printed and logged (``clnp/...``), and with ``checkpoint_dir`` the task's
  result is saved as ``task<t>.pt`` (model ``state_dict`` + CLNP state) for the next task.

Contract for the pruning search: validation batches are ``(x, y, task)`` and the module is called as
``module(x, task)``, returning logits (:class:`lightning_ext.models.ContinualMLP` does).

Zero forgetting needs no normalisation layer (refused at setup) and finite activations. Masks and
frozen rows live in the forward pass, so weight decay, momentum, gradient accumulation and DeepSpeed
ZeRO leave old tasks untouched. Decisions that are ours: activation L1 by default (the paper's text;
weight L1 as an option), one threshold over all layers, binary search (assumes accuracy falls
monotonically as more neurons are pruned), no fine-tuning after pruning.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_ext._checks import check_choice, check_int, check_names, check_number, check_str
from lightning_ext._lightning_compat import pending_ckpt_path
from lightning_ext.callbacks.base import Technique
from lightning_ext.callbacks.step_wrapper import unwrap_training_step, wrap_training_step
from lightning_ext.nn.clnp import CLNPLinear, activity_l1
from lightning_ext.nn.clnp_network import CLNPNetwork
from lightning_ext.progress import setup_bar
from lightning_ext.strategies.probe import strategy_info
from lightning_ext.surgery import gathered_parameters

__all__ = ["CLNP"]

L1_MODES = ("activations", "weights", "both")


class CLNP(Technique):
    """Continual learning via neural pruning: one ``trainer.fit`` per task (see the module docstring).

    Args:
        layers: names of the hidden ``nn.Linear`` layers, in forward order (each reads the previous
            one's output). Default: every ``nn.Linear`` outside ``heads``, in registration order.
        heads: name of the ``nn.ModuleList`` holding one ``nn.Linear`` head per task.
        task: the task id of this fit (default: ``trainer.datamodule.task``).
        l1: weight of the sparsity penalty (>= 0).
        l1_on: ``"activations"`` (default), ``"weights"`` or ``"both"``.
        margin: validation-accuracy drop tolerated by the pruning, in [0, 1].
        seed: seed of the re-initialisation of free neurons.
        checkpoint_dir: if set, load ``task<t-1>.pt`` before task ``t`` and save ``task<t>.pt`` after it.
        reuse_threshold: an old neuron counts as reused when a new row reads it with a weight above this
            fraction of the mean |weight| of the new rows (diagnostic only).
    """

    technique_name = "CLNP"

    def __init__(self, layers: list[str] | None = None, heads: str = "heads", task: int | None = None,
                 l1: float = 1e-3, l1_on: str = "activations", margin: float = 0.015, seed: int = 0,
                 checkpoint_dir: str | None = None, reuse_threshold: float = 0.05) -> None:
        super().__init__()
        check_names("layers", layers, optional=True)
        check_str("heads", heads)
        check_int("task", task, 0, optional=True)
        check_number("l1", l1, 0.0)
        check_choice("l1_on", l1_on, L1_MODES)
        check_number("margin", margin, 0.0, 1.0)
        check_int("seed", seed, 0)
        check_str("checkpoint_dir", checkpoint_dir, optional=True)
        check_number("reuse_threshold", reuse_threshold, 0.0)
        self.layer_names, self.heads_name, self.task = layers, heads, task
        self.l1, self.l1_on, self.margin, self.seed = l1, l1_on, margin, seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.reuse_threshold = reuse_threshold
        self.state = {"finished": 0, "history": []}
        self.network: CLNPNetwork | None = None
        self.layers: list[CLNPLinear] = []
        self.heads: list[CLNPLinear] = []
        self._penalty: list[torch.Tensor] = []
        self._current: int | None = None
        self._wrapped: tuple[pl.LightningModule, Any] | None = None

    # -- structure ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> None:
        """Convert the layers and heads in place (idempotent); usable outside a Trainer."""
        self.network = CLNPNetwork.convert(model, self.layer_names, self.heads_name)
        self.layers, self.heads = self.network.layers, self.network.heads

    def _sync_inputs(self) -> None:
        self.network.sync_inputs()

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        info = strategy_info(trainer)
        if info.is_fsdp:
            raise RuntimeError("CLNP with FSDP is not supported: pruning and freezing rewrite weight rows and "
                               "masks outside the forward, where FSDP holds only each rank's shard. Use DDP or "
                               "DeepSpeed ZeRO-1/2/3.")
        if info.is_deepspeed and str(trainer.precision) != "32-true":
            raise RuntimeError(f"CLNP with {info} and precision={trainer.precision!r} is not supported: "
                               "DeepSpeed then holds the weights in reduced precision, and CLNP's frozen rows and "
                               "activity masks, written outside the engine, stay float32. Use precision='32-true' "
                               "under DeepSpeed, or DDP with bf16-mixed.")
        self.prepare(pl_module)
        task = self._task_of(trainer)
        if task >= len(self.heads):
            raise ValueError(f"CLNP: task {task} has no head: {self.heads_name!r} holds {len(self.heads)}")
        self._current = task
        if pending_ckpt_path(trainer) is None:  # a resumed task gets everything from its checkpoint
            self._load_previous(pl_module, task)
            self._begin_task(task)
        self._install(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._wrapped is not None and stage == "fit":
            unwrap_training_step(*self._wrapped)
            self._wrapped = None
            for layer in self.layers:
                layer.activity_hook = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.interrupted or self._current is None:
            return
        record = self.prune_and_commit(trainer, pl_module, self._current)
        self._report(trainer, record)
        if self.checkpoint_dir is not None:
            self._save_task(trainer, pl_module, self._current)

    # -- the technique --------------------------------------------------------------------------
    def _task_of(self, trainer: pl.Trainer) -> int:
        if self.task is not None:
            return self.task
        task = getattr(trainer.datamodule, "task", None) if trainer.datamodule is not None else None
        if not isinstance(task, int):
            raise ValueError("CLNP needs the task id: pass CLNP(task=...) or use a datamodule with an int `task` "
                             "attribute (e.g. lightning_ext.data.SplitDigitsDataModule)")
        return task

    def _begin_task(self, task: int) -> None:
        finished = self.state["finished"]
        if task != finished:
            raise ValueError(f"CLNP: tasks run in order, one fit each; {finished} finished, so the next task is "
                             f"{finished}, not {task}" + (" (use checkpoint_dir to carry results between "
                                                         "processes)" if task > finished else ""))
        self.network.begin_task(task, self.seed)

    def _install(self, pl_module: pl.LightningModule) -> None:
        if self._wrapped is not None:
            return
        def wrap(original: Callable) -> Callable:
            def training_step(*args: Any, **kwargs: Any) -> Any:
                self._penalty.clear()
                output = original(*args, **kwargs)
                penalty = self.penalty()
                self._penalty.clear()
                if penalty is None:
                    return output
                if isinstance(output, torch.Tensor):
                    return output + self.l1 * penalty
                return {**output, "loss": output["loss"] + self.l1 * penalty}
            return training_step

        self._wrapped = (pl_module, wrap_training_step(pl_module, wrap))
        # only this task's head trains (the others would be unused parameters under DDP)
        for index, head in enumerate(self.heads):
            for p in head.parameters():
                p.requires_grad_(index == self._current)
        if self.l1 > 0 and self.l1_on in ("activations", "both"):
            for layer in self.layers:
                layer.activity_hook = self._collect

    def _collect(self, layer: CLNPLinear, out: torch.Tensor) -> None:
        if layer.training and torch.is_grad_enabled():
            # mean over the batch of the summed activity of the trainable neurons
            self._penalty.append(activity_l1(out, layer.train_rows) / out[..., 0].numel())

    def penalty(self) -> torch.Tensor | None:
        """The L1 term of the current forward pass (activations) and/or of the trainable rows' weights."""
        if self.l1 == 0:
            return None
        terms = list(self._penalty)
        if self.l1_on in ("weights", "both"):
            terms += self.network.weight_l1()
        return sum(terms[1:], terms[0]) if terms else None

    def prune_and_commit(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> dict[str, Any]:
        """Measure activity on validation data, search the threshold, allocate and freeze (task end)."""
        loader = trainer.datamodule.val_dataloader() if trainer.datamodule is not None else trainer.val_dataloaders
        with setup_bar(trainer, f"CLNP task {task}: threshold search", unit="pass") as bar:
            record = self.network.prune_and_commit(pl_module, loader, task, self.margin, pl_module.device,
                                                   on_pass=bar.update)
        record["layers"] = self.capacity(task)
        self.state["history"].append(record)
        self.state["finished"] = task + 1
        return record

    def capacity(self, task: int) -> list[dict[str, int]]:
        """Per layer: neurons allocated to ``task`` (new), old neurons its rows read (reused), free ones."""
        return self.network.capacity(task, self.reuse_threshold)

    def _report(self, trainer: pl.Trainer, record: dict[str, Any]) -> None:
        names = self.layer_names or [f"layer{i}" for i in range(len(self.layers))]
        lines = [f"CLNP task {record['task']}: val acc {record['val_acc_before']:.3f} -> {record['val_acc_after']:.3f}",
                 "| layer | new | reused | free |", "|---|---|---|---|"]
        metrics = {"clnp/val_acc_before_prune": record["val_acc_before"],
                   "clnp/val_acc_after_prune": record["val_acc_after"]}
        for name, row in zip(names, record["layers"]):
            lines.append(f"| {name} | {row['new']} | {row['reused']} | {row['free']} |")
            for key in ("new", "reused", "free"):
                metrics[f"clnp/{key}/{name}"] = row[key]
        rank_zero_info("\n".join(lines))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # -- carrying results between fits ------------------------------------------------------------
    def task_file(self, task: int) -> Path:
        assert self.checkpoint_dir is not None
        return self.checkpoint_dir / f"task{task}.pt"

    def _load_previous(self, pl_module: pl.LightningModule, task: int) -> None:
        if self.checkpoint_dir is None or task == 0 or self.state["finished"] >= task:
            return
        path = self.task_file(task - 1)
        if not path.is_file():
            raise FileNotFoundError(f"CLNP: task {task} needs the result of task {task - 1}, {path}, which does not "
                                    f"exist; run the tasks in order with the same checkpoint_dir")
        self.load_task(pl_module, task - 1)

    def load_task(self, model: nn.Module, task: int) -> None:
        """Load the saved result of ``task`` (``checkpoint_dir/task<t>.pt``) into ``model`` and this callback."""
        self.prepare(model)
        saved = torch.load(self.task_file(task), map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state_dict"])
        self.load_state_dict(saved["clnp"])

    def _save_task(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        with gathered_parameters(pl_module):  # a collective under ZeRO-3: every rank enters
            if trainer.is_global_zero:
                state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
                self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"state_dict": state, "clnp": self.state_dict()}, self.task_file(task))
        trainer.strategy.barrier("clnp_save_task")

    def state_dict(self) -> dict[str, Any]:
        return {"finished": self.state["finished"], "history": [dict(h) for h in self.state["history"]]}
