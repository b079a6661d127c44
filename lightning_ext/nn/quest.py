r"""QuEST: quantization-aware training with Hadamard rotation, Gaussian-MSE-optimal scales and the trust
gradient estimator (Panferov et al., "QuEST: Stable Training of LLMs with 1-Bit Weights and Activations",
ICML 2025, arXiv 2502.05003; reference code github.com/IST-DASLab/QuEST at c295afd).

For each quantized linear ``y = x Wᵀ + b`` both operands are quantized row by row (weight rows = output
channels, activation rows = tokens), along the reduction dimension:

1. rotate every 128-wide block by the orthonormal Hadamard matrix (:func:`~lightning_ext.nn.hadamard.block_hadamard`);
2. clip at ``s = α*(b)·RMS(row)``, the Gaussian-MSE-optimal multiple (:data:`ALPHA_STAR`, the reference's table);
3. round to the centred grid of ``2^b`` levels ``±Δ/2, ±3Δ/2, …, ±s`` with ``Δ = 2s/(2^b − 1)``;
4. backward: straight-through only where ``|q − u| ≤ trust_scale·Δ/2`` (the trust mask), zero elsewhere.

Both operands stay in the rotated basis ("half-Hadamard"): ``Q(xH)·Q(WH)ᵀ`` — ``H Hᵀ = I``, so no inverse
rotation is paid. The scale is not differentiated (as in the reference). Written here (no maintained library
implements QuEST); differences from the reference code: the rotation is a blocked reshape-matmul instead of a
dense ``in × in`` block-diagonal matrix (same numbers, a fraction of the cost), the trust mask is saved as a
bool tensor instead of a float one, ``round`` runs in fp32 under autocast, and the layer is built lazily on any
device. Options beyond the paper's default, for ablations: ``hadamard=False``, ``scale="absmax"`` (max
scaling) and ``trust_scale=None`` (plain straight-through estimator).

Two paths compute the same layer: this module's eager one (ATen kernels; the reference, and what runs on GPUs and
in bf16) and the one-pass C++ CPU kernels of :mod:`lightning_ext.nn.quest_fused` (``fused=None``, the default,
takes them wherever they run). The fused path rotates by butterflies instead of the matmul and is otherwise the
eager arithmetic bit for bit; its docstring says what that means for the two paths' outputs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext._checks import check_bool, check_choice, check_int, check_number
from lightning_ext.nn.hadamard import block_hadamard
from lightning_ext.nn.quest_fused import fused_rotate, fused_rotate_quantize, rotate, use_fused
from lightning_ext.surgery import OUTPUT_HEADS

__all__ = ["ALPHA_STAR", "QuantizedRows", "QuestInt", "QuestLinear", "apply_quest", "convert_quest",
           "gaussian_grid_mse", "quest_quantize", "row_step", "trust_quantize"]

#: Gaussian-MSE-optimal clip multiples α*(b) of the row RMS (QuEST reference table)
ALPHA_STAR = {1: 0.79788, 2: 1.49353, 3: 2.05107, 4: 2.51393, 5: 2.91609, 6: 3.27660, 7: 3.60105, 8: 3.88494}
SCALES = ("gaussian", "absmax")


def _check_bits(bits: int | None, name: str, allow_none: bool = False, also: str = "") -> None:
    if bits is None and allow_none:
        return
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ValueError(f"{name} must be an int in [1, 8]{' or None' if allow_none else ''}{also}, got {bits!r}")


def check_layer_args(weight_bits: int, act_bits: int | None, trust_scale: float | None, block: int,
                     hadamard: bool, scale: str, fused: bool | None = None) -> None:
    """The checks of :meth:`QuestLinear.from_linear`'s arguments, callable before any layer exists (the
    callback's ``__init__``)."""
    check_bool("fused", fused, optional=True)
    _check_bits(weight_bits, "weight_bits")
    _check_bits(act_bits, "act_bits", allow_none=True)
    check_number("trust_scale", trust_scale, 0.0, low_open=True, optional=True)
    check_choice("scale", scale, SCALES)
    check_bool("hadamard", hadamard)
    check_int("block", block, 1)
    if block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")


def gaussian_grid_mse(alpha: float, bits: int, points: int = 400_001) -> float:
    """``E[(Z − Q(Z))²]`` for ``Z ~ N(0, 1)`` and the centred ``2^b``-level grid clipped at ``±alpha``
    (numerical quadrature in float64; for tests and for re-deriving :data:`ALPHA_STAR`)."""
    z = torch.linspace(-12, 12, points, dtype=torch.float64)
    half = (2**bits - 1) / 2
    step = 2 * alpha / (2**bits - 1)
    q = ((z / step).clamp(-half, half) + 0.5).round().sub(0.5) * step
    density = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return float(torch.trapezoid((z - q) ** 2 * density, z))


class QuantizedRows:
    """What :func:`quest_quantize` computed: values ``q``, integer ``codes`` (0 … 2^b − 1), per-row ``step``."""

    __slots__ = ("q", "codes", "step")

    def __init__(self, q: torch.Tensor, codes: torch.Tensor, step: torch.Tensor) -> None:
        self.q, self.codes, self.step = q, codes, step


def row_step(work: torch.Tensor, bits: int, scale: str = "gaussian") -> torch.Tensor:
    """The grid step ``Δ = 2s/(2^b − 1)`` of each row of ``work`` (shape ``[..., 1]``; ``s`` the clip value),
    shared by the eager and the fused quantizer so that both use the same bits."""
    if scale == "gaussian":
        s = torch.linalg.vector_norm(work, dim=-1, keepdim=True).mul_(ALPHA_STAR[bits] / math.sqrt(work.shape[-1]))
    else:
        s = work.abs().amax(dim=-1, keepdim=True)
    return s.mul_(2.0 / (2**bits - 1)).clamp_min_(torch.finfo(torch.float32).tiny)


def quest_quantize(u: torch.Tensor, bits: int, scale: str = "gaussian") -> QuantizedRows:
    """Quantize each row (last dimension) of ``u`` to the centred ``2^bits`` grid (no gradient)."""
    levels = 2**bits
    work = u if u.dtype == torch.float64 else u.float()  # round in fp32 (or fp64), never in bf16/fp16
    step = row_step(work, bits, scale)
    half = (levels - 1) / 2
    # level index round(v + 1/2) - 1/2 on the centred grid, shifted to the integers 0 … levels-1
    codes = (work / step).clamp_(-half, half).add_(0.5).round_().add_(half - 0.5)
    q = (codes - half).mul_(step)
    return QuantizedRows(q.to(u.dtype), codes, step)


def record_stats(stats: dict, q: torch.Tensor, u: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Diagnostics of one quantized operand, only on logging steps: relative MSE and trust fraction."""
    err = (q.float() - u.float()).pow_(2).sum() / u.float().pow(2).sum().clamp_min(1e-30)
    stats["rel_mse"] = err.detach()
    stats["trust_fraction"] = mask.float().mean() if mask is not None else torch.ones(())


class _TrustQuantize(torch.autograd.Function):
    """Forward: the quantized rows. Backward: the gradient where ``|q − u| ≤ trust_scale·Δ/2`` (all of it when
    ``trust_scale`` is None: the plain straight-through estimator). Saves only a bool mask."""

    @staticmethod
    def forward(ctx: Any, u: torch.Tensor, bits: int, scale: str, trust_scale: float | None,
                stats: dict | None) -> torch.Tensor:
        out = quest_quantize(u, bits, scale)
        mask = None
        if trust_scale is not None:
            mask = (out.q - u).abs_() <= out.step * (trust_scale / 2)
            ctx.save_for_backward(mask)
        ctx.ste = mask is None
        if stats is not None:
            record_stats(stats, out.q, u, mask)
        return out.q

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if ctx.ste:
            return grad, None, None, None, None
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def trust_quantize(u: torch.Tensor, bits: int, scale: str = "gaussian", trust_scale: float | None = 1.0,
                   stats: dict | None = None) -> torch.Tensor:
    """Differentiable quantization of the rows of ``u`` with the trust estimator (see module docstring)."""
    return _TrustQuantize.apply(u, bits, scale, trust_scale, stats)


class QuestLinear(nn.Linear):
    """``nn.Linear`` whose input and weight are QuEST-quantized (fake quantization for training).

    Build with :meth:`from_linear` (the original ``Parameter`` objects are kept, so the ``state_dict`` is the
    plain layer's: QuEST is stateless). ``act_bits=None`` leaves activations unquantized (``WbA16``);
    ``quest_enabled = False`` makes the layer a plain linear (delayed start). ``fused``: the one-pass C++
    kernels of :mod:`lightning_ext.nn.quest_fused` (``None``, the default: where they run, else eager with one log
    line; ``True``: always, or an error; ``False``: the eager reference); ``last_path`` says which ran last
    (``"fused"``/``"eager"``). :meth:`export` returns the integer form. ``last_stats`` holds
    ``{"weight": {...}, "input": {...}}`` (relative MSE, trust fraction) from the last forward with
    ``collect_stats = True``.
    """

    #: the technique whose surgery installs this layer (lightning_ext.surgery refuses a second one on it)
    surgery_technique = "QuEST"

    weight_bits: int
    act_bits: int | None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_bits: int = 4, act_bits: int | None = 4,
                    trust_scale: float | None = 1.0, block: int = 128, hadamard: bool = True,
                    scale: str = "gaussian", fused: bool | None = None) -> QuestLinear:
        check_layer_args(weight_bits, act_bits, trust_scale, block, hadamard, scale, fused)
        if hadamard and linear.in_features % block:
            raise ValueError(f"in_features={linear.in_features} is not a multiple of the Hadamard block {block} "
                             "(QuEST rotates 128-wide blocks of the reduction dimension; exclude this layer or "
                             "choose a block that divides it)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)  # no fresh weight allocated: the original Parameters are reused
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.weight_bits, new.act_bits, new.trust_scale = weight_bits, act_bits, trust_scale
        new.block, new.hadamard, new.scale = block, hadamard, scale
        new.fused, new.last_path = fused, None
        new.quest_enabled, new.collect_stats, new.last_stats = True, False, {}
        return new

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, W{self.weight_bits}A{self.act_bits or 16}, trust_scale={self.trust_scale}, "
                f"block={self.block if self.hadamard else None}, scale={self.scale}, fused={self.fused}")

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        return block_hadamard(t, self.block) if self.hadamard else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quest_enabled:
            return F.linear(x, self.weight, self.bias)
        stats_w = {} if self.collect_stats else None
        stats_x = {} if self.collect_stats and self.act_bits is not None else None
        fused = use_fused(self.fused, self.weight, x)
        self.last_path = "fused" if fused else "eager"
        if fused:
            block = self.block if self.hadamard else None
            w = fused_rotate_quantize(self.weight, self.weight_bits, self.scale, self.trust_scale, block, stats_w)
            if self.act_bits is not None:
                xr = fused_rotate_quantize(x, self.act_bits, self.scale, self.trust_scale, block, stats_x)
            else:
                xr = fused_rotate(x, block)  # the weight's rotation: the butterflies
        else:
            w = trust_quantize(self._rotate(self.weight), self.weight_bits, self.scale, self.trust_scale, stats_w)
            xr = self._rotate(x)
            if self.act_bits is not None:
                xr = trust_quantize(xr, self.act_bits, self.scale, self.trust_scale, stats_x)
        if self.collect_stats:
            self.last_stats = {"weight": stats_w, **({"input": stats_x} if stats_x is not None else {})}
        return F.linear(xr, w.to(xr.dtype), self.bias)

    @torch.no_grad()
    def export(self) -> QuestInt:
        """The integer form: codes of the rotated weight (uint8) and per-row steps; same outputs (the same
        rotation too: butterflies where the fused path runs, the matmul where the eager one does)."""
        block = self.block if self.hadamard else None
        out = quest_quantize(_rotation(self.weight.detach(), block, self.fused), self.weight_bits, self.scale)
        return QuestInt(out.codes.to(torch.uint8), out.step, None if self.bias is None else self.bias.detach().clone(),
                        self.weight_bits, self.act_bits, block, self.scale, self.fused)


def _rotation(t: torch.Tensor, block: int | None, fused: bool | None) -> torch.Tensor:
    """The rotation the layer's path applies, without gradient (export and inference)."""
    if block is None:
        return t
    return rotate(t, block) if use_fused(fused, t) else block_hadamard(t, block)


class QuestInt(nn.Module):
    """Inference form of a :class:`QuestLinear`: ``codes`` (uint8, ``2^b`` levels) of the *rotated* weight and
    ``step`` per output row; activations are rotated and quantized online, as in training. Buffers only."""

    #: the technique whose surgery installs this layer (lightning_ext.surgery refuses a second one on it)
    surgery_technique = "QuEST"

    def __init__(self, codes: torch.Tensor, step: torch.Tensor, bias: torch.Tensor | None, weight_bits: int,
                 act_bits: int | None, block: int | None, scale: str, fused: bool | None = None) -> None:
        super().__init__()
        self.fused = fused
        self.register_buffer("codes", codes)
        self.register_buffer("step", step)
        self.register_buffer("bias", bias)
        self.weight_bits, self.act_bits, self.block, self.scale = weight_bits, act_bits, block, scale
        self.in_features, self.out_features = codes.shape[1], codes.shape[0]

    def dequantized_weight(self) -> torch.Tensor:
        """The rotated weight ``Q(WH)`` the training forward used."""
        return (self.codes.float() - (2**self.weight_bits - 1) / 2) * self.step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = _rotation(x, self.block, self.fused)
        if self.act_bits is not None:
            xr = quest_quantize(xr, self.act_bits, self.scale).q
        return F.linear(xr, self.dequantized_weight().to(xr.dtype), self.bias)


DEFAULT_EXCLUDE = OUTPUT_HEADS  # output heads stay in full precision by default


def apply_quest(model: nn.Module, targets: Any = None, exclude: Any = DEFAULT_EXCLUDE,
                **layer_args: Any) -> dict[str, QuestLinear]:
    """Swap the selected ``nn.Linear`` layers of ``model`` for :class:`QuestLinear` (all or nothing;
    idempotent: layers already swapped are left alone). ``targets``: name patterns (peft's rules,
    :mod:`lightning_ext.surgery`), default every ``nn.Linear``; ``exclude``: names kept in full precision
    (default: output heads). ``layer_args`` go to :meth:`QuestLinear.from_linear`."""
    from lightning_ext.surgery import replace_modules, select_modules

    selected = select_modules(model, targets, types=[nn.Linear], exclude=exclude, what="QuEST targets")
    todo = [name for name, m in selected if not isinstance(m, QuestLinear)]
    if todo:
        replace_modules(model, todo, lambda _, old: QuestLinear.from_linear(old, **layer_args),
                        technique="QuEST")
    return {name: model.get_submodule(name) for name, _ in selected}


def convert_quest(model: nn.Module) -> dict[str, QuestInt]:
    """Replace every :class:`QuestLinear` in ``model`` by its integer form :class:`QuestInt` (in place)."""
    from lightning_ext.surgery import replace_modules

    names = [name for name, m in model.named_modules() if isinstance(m, QuestLinear)]
    if not names:
        raise ValueError("convert_quest: the model has no QuestLinear layer (apply QuEST first)")
    return replace_modules(model, names, lambda _, old: old.export())
