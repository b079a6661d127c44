r"""Weight compander: weights reparameterized as ``w = f_φ(v)`` with a learnable element-wise "compander" ``f``
that expands small magnitudes and compresses large ones (Cakaj, Mehnert, Yang, "A Simple Weight
Reparameterization for Regularization", arXiv 2306.16993, 2023).

**The paper's exact function could not be confirmed** (only its abstract was reachable; no public code).
What it states, and what every compander here satisfies for every value its hyper-parameters can take: ``f``
is odd, strictly increasing, has slope > 1 at 0 (weights are pushed away from zero — "dead" weights
re-activate) and is compressive for large ``|v|`` (``f(v)/v → 0``); its hyper-parameters are learned.

* :class:`AsinhCompander` (default, **a lightning_ext reconstruction, not the paper's formula**):
  ``f(v) = α·asinh(β v / α)``, ``α = softplus(a) > 0``, ``β = 1 + softplus(b) > 1``; globally invertible
  (``f⁻¹(w) = (α/β)·sinh(w/α)``), so any pretrained weight loads; its slope decays like ``1/|v|``, so large
  latents keep learning.
* :class:`TanhCompander` (bounded alternative): ``f(v) = α·tanh(β v / α)``; ``|w| < α`` always, so a
  pretrained weight with ``|w| ≥ α`` is refused on load.

The mechanics are ``torch.nn.utils.parametrize`` (reused, not rewritten): :func:`apply_compander` registers a
compander on each selected layer's ``weight`` (``right_inverse`` turns the current weight into the latent, so
outputs are unchanged), :func:`remove_compander` bakes ``f(v)`` back into a plain ``weight``. Checkpoint keys
change while the parametrization is on: ``<layer>.weight`` becomes ``<layer>.parametrizations.weight.original``
(the latent ``v``) plus ``<layer>.parametrizations.weight.0.a`` / ``.b`` (raw hyper-parameters). Weight decay
acts on ``v``, not on ``w``. ``f`` is computed in fp32 under autocast. Custom companders subclass
:class:`Compander` (``forward``, ``right_inverse``, hyper-parameters as ``nn.Parameter``) and can be named by
class path from YAML.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["AsinhCompander", "Compander", "TanhCompander", "apply_compander", "compander_parameters",
           "remove_compander"]


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


class Compander(nn.Module):
    """Base: ``forward(v) -> w``, ``right_inverse(w) -> v``; ``alpha`` (scale) and ``beta`` (slope at 0).

    Args:
        alpha: compression scale (> 0); ``None``: ``alpha_scale · std(W₀)`` of the layer it is applied to.
        beta: slope at zero (> 1).
        alpha_scale: see ``alpha``.
        learnable: hyper-parameters are ``nn.Parameter`` (else buffers).
    """

    #: a module reparameterized by a compander belongs to WeightCompander (lightning_ext.surgery.technique_of)
    surgery_technique = "WeightCompander"

    def __init__(self, alpha: float | None = None, beta: float = 1.5, alpha_scale: float = 2.0,
                 learnable: bool = True) -> None:
        super().__init__()
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None: alpha_scale * std of the weight), got {alpha}")
        if not beta > 1:
            raise ValueError(f"beta (the slope at 0) must be > 1, got {beta}")
        if not alpha_scale > 0:
            raise ValueError(f"alpha_scale must be > 0, got {alpha_scale}")
        self.alpha_scale, self.learnable = alpha_scale, learnable
        make = nn.Parameter if learnable else (lambda t: t)
        # shape [1], not 0-d: DeepSpeed's flat buffers cannot take 0-d parameters
        a = torch.tensor([_inverse_softplus(alpha if alpha is not None else 1.0)], dtype=torch.float32)
        b = torch.tensor([_inverse_softplus(beta - 1.0)], dtype=torch.float32)
        if learnable:
            self.a, self.b = make(a), make(b)
        else:
            self.register_buffer("a", a)
            self.register_buffer("b", b)
        self._alpha_given = alpha is not None

    @property
    def alpha(self) -> torch.Tensor:
        return F.softplus(self.a)

    @property
    def beta(self) -> torch.Tensor:
        return 1.0 + F.softplus(self.b)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> None:
        """Set ``alpha`` from the weight it will reparameterize (when it was not given)."""
        if not self._alpha_given:
            std = float(weight.detach().float().std()) if weight.numel() > 1 else 1.0
            self.a.fill_(_inverse_softplus(max(self.alpha_scale * std, 1e-6)))

    def function(self, v: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def inverse(self, w: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        work = v if v.dtype == torch.float64 else v.float()
        alpha, beta = self.alpha.to(work.dtype), self.beta.to(work.dtype)
        return self.function(work, alpha, beta).to(v.dtype)

    @torch.no_grad()
    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        work = w if w.dtype == torch.float64 else w.float()
        return self.inverse(work, self.alpha.to(work.dtype), self.beta.to(work.dtype)).to(w.dtype)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4g}, beta={float(self.beta):.4g}, learnable={self.learnable}"


class AsinhCompander(Compander):
    """``f(v) = α·asinh(β v / α)``: unbounded, logarithmic growth, invertible everywhere (the default)."""

    def function(self, v, alpha, beta):
        return alpha * torch.asinh(beta * v / alpha)

    def inverse(self, w, alpha, beta):
        return (alpha / beta) * torch.sinh(w / alpha)


class TanhCompander(Compander):
    """``f(v) = α·tanh(β v / α)``: bounded by ``α``; weights with ``|w| ≥ α`` cannot be loaded."""

    def inverse(self, w, alpha, beta):
        if bool((w.abs() >= alpha).any()):
            raise ValueError(f"TanhCompander: weights up to |w| = {float(w.abs().max()):.4g} lie outside its range "
                             f"(-alpha, alpha) with alpha = {float(alpha):.4g}; raise alpha / alpha_scale or use "
                             "AsinhCompander")
        return (alpha / beta) * torch.atanh(w / alpha)

    def function(self, v, alpha, beta):
        return alpha * torch.tanh(beta * v / alpha)


def _resolve(compander: str | type[Compander]) -> type[Compander]:
    if isinstance(compander, str):
        module, _, name = compander.rpartition(".")
        try:
            compander = getattr(importlib.import_module(module or "lightning_ext.nn.compander"), name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(f"compander: cannot import {compander!r} ({err})") from err
    if not (isinstance(compander, type) and issubclass(compander, nn.Module)
            and hasattr(compander, "right_inverse")):
        raise ValueError(f"compander must be an nn.Module class with forward and right_inverse, got {compander!r}")
    return compander


DEFAULT_TYPES = ("torch.nn.Linear", "torch.nn.Conv1d", "torch.nn.Conv2d", "torch.nn.Conv3d")


def apply_compander(model: nn.Module, targets: Any = None, types: Any = DEFAULT_TYPES, exclude: Any = None,
                    compander: str | type[Compander] = AsinhCompander, compander_args: dict | None = None,
                    per_layer: bool = True) -> dict[str, nn.Module]:
    """Register a compander on the ``weight`` of each selected layer (idempotent; all or nothing).

    Returns ``{layer name: compander}``. With ``per_layer=False`` one compander (one set of hyper-parameters,
    ``alpha`` from the first layer's weight) is shared by all layers.
    """
    from lightning_ext.surgery import SurgeryError, select_modules

    cls = _resolve(compander)
    selected = select_modules(model, targets, types=types, exclude=exclude, what="WeightCompander targets")
    todo = [(n, m) for n, m in selected if not parametrize.is_parametrized(m, "weight")]
    made, shared = {}, None
    try:
        for name, module in todo:
            if shared is None or per_layer:
                comp = cls(**(compander_args or {}))
                if hasattr(comp, "init_from"):
                    comp.init_from(module.weight)
                comp = comp.to(module.weight.device)
                shared = comp
            made[name] = shared
        for name, module in todo:  # right_inverse may refuse (bounded compander): check every layer first
            made[name].right_inverse(module.weight)
    except Exception as err:
        raise SurgeryError(f"WeightCompander: model left unchanged: {type(err).__name__}: {err}") from err
    for name, module in todo:
        parametrize.register_parametrization(module, "weight", made[name])
    return {name: m.parametrizations.weight[0] for name, m in selected}


def compander_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable hyper-parameters of every compander in ``model`` (for their own param group)."""
    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, Compander):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def remove_compander(model: nn.Module) -> list[str]:
    """Bake ``f(v)`` into plain ``weight`` tensors (export); returns the layer names."""
    names = []
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight") and any(
                isinstance(p, Compander) for p in module.parametrizations.weight):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            names.append(name)
    return names
