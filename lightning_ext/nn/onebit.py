r"""OneBit: 1-bit linear layers with two value vectors, SVID initialisation and knowledge distillation
(Xu et al., "OneBit: Towards Extremely Low-bit Large Language Models", NeurIPS 2024, arXiv 2402.11295;
reference code github.com/xuyuzhuang11/OneBit at 42d6d7b).

A :class:`OneBitLinear` keeps a latent weight ``W`` (trained) and uses only its sign, with an input-side
vector ``g`` and an output-side vector ``h``, followed by a parameter-free LayerNorm::

    Y = [(X ⊙ g) · sign(W)ᵀ] ⊙ h,      Z = LayerNorm(Y)       (sign(0) = +1)

The backward through the sign is the reference's surrogate ``∂/∂W = grad · (1.001 − tanh²(W))``.
SVID (:func:`svid`): ``|W₀| ≈ a bᵀ`` by rank-1 SVD (the top singular vectors of a nonnegative matrix can be
taken nonnegative, so rank-1 SVD and rank-1 NMF share the optimum), ``h = a``, ``g = b``; the latent starts at
``sign(W₀)·latent_scale`` (reference: 0.01). ``init="nmf"`` runs multiplicative-update NMF instead (parity
option), ``"naive"`` uses ``h = mean_row |W₀|``, ``g = 1``. Export: :meth:`OneBitLinear.export` packs 8 signs
per byte (:func:`pack_signs`) with ``g``, ``h`` — same outputs.

Distillation (:func:`distillation_loss`): we follow the **paper's formula** — soft cross-entropy against the
teacher (as KL(teacher ‖ student), averaged **per token**) plus ``mse_weight`` × the sum over chosen layers of
the per-token mean squared distance between row-L2-normalised hidden states. The reference code instead uses
``kl_div(reduction="batchmean")`` on ``[B, T, V]`` (a sum over tokens) times 0.01, which at its sequence length
weights the KL about 20× the per-token value relative to the MSE: set ``kl_weight≈20`` to mimic that ratio.
Hidden states are the outputs of the modules the caller names (we use block outputs 1..L, the formula; the
reference's HF ``hidden_states[0..L−1]`` indexing is off by one and includes the embedding). No maintained
library implements OneBit; written from the paper and the reference's description.

``fused`` (default ``None``: wherever it runs) moves ``g`` and ``h`` onto the weight — one C++ pass builds
``h ⊙ sign(W) ⊙ gᵀ`` and one turns its gradient into those of ``W``, ``g``, ``h`` — so that no activation-sized
elementwise pass remains (:mod:`lightning_ext.nn.onebit_fused`; equal to the eager path to rounding, not bit for
bit; the eager path is the reference and runs on GPUs and in bf16).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_ext._checks import check_bool
from lightning_ext.nn.onebit_fused import PATH, effective_weight

__all__ = ["OneBitLinear", "OneBitPacked", "distillation_loss", "export_packed", "output_logits", "pack_signs", "sign_pm1",
           "svid", "unpack_signs"]

INITS = ("svd", "nmf", "naive")


def sign_pm1(w: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``w >= 0``, ``-1`` elsewhere (the same rule in training and packing)."""
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)


class _SignSurrogate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w)
        return sign_pm1(w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (w,) = ctx.saved_tensors
        return grad * (1.001 - torch.tanh(w).square())


def _normalize(y: torch.Tensor, layer_norm: bool) -> torch.Tensor:
    """The parameter-free LayerNorm over the output features (in fp32 under autocast), if the layer has it."""
    if not layer_norm:
        return y
    work = y if y.dtype == torch.float64 else y.float()
    return F.layer_norm(work, (y.shape[-1],)).to(y.dtype)


def svid(weight: torch.Tensor, init: str = "svd", iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, g)`` with ``|W| ≈ h gᵀ`` (both >= 0): rank-1 SVD, rank-1 NMF, or the naive row means."""
    a = weight.detach().abs().double()
    if init == "svd":
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        root = s[0].sqrt()
        h, g = u[:, 0].abs() * root, vh[0].abs() * root
    elif init == "nmf":  # multiplicative updates (Lee & Seung) from the row/column means
        h, g = a.mean(1), torch.ones(a.shape[1], dtype=a.dtype)
        for _ in range(iters):
            h = h * (a @ g) / (h * (g @ g)).clamp_min(1e-30)
            g = g * (a.t() @ h) / (g * (h @ h)).clamp_min(1e-30)
    elif init == "naive":
        h, g = a.mean(1), torch.ones(a.shape[1], dtype=a.dtype)
    else:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return h.to(weight.dtype), g.to(weight.dtype)


def pack_signs(w: torch.Tensor) -> torch.Tensor:
    """Signs of ``w`` (``w >= 0`` → bit 1) packed 8 per byte along the flattened tensor (uint8)."""
    bits = (w.detach().flatten() >= 0).to(torch.uint8)
    bits = F.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=w.device)
    return (bits * weights).sum(1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, shape: torch.Size | tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: a ``±1`` tensor of ``shape``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    n = math.prod(shape)
    return (bits.flatten()[:n].to(dtype) * 2 - 1).view(shape)


class OneBitLinear(nn.Module):
    """``Z = LayerNorm([(X ⊙ g) sign(W)ᵀ] ⊙ h + bias)`` with a trained latent ``W`` (see module docstring)."""

    #: the technique whose surgery installs this layer (lightning_ext.surgery refuses a second one on it)
    surgery_technique = "OneBit"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, layer_norm: bool = True,
                 device: Any = None, dtype: Any = None, fused: bool | None = None) -> None:
        super().__init__()
        check_bool("fused", fused, optional=True)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.layer_norm = in_features, out_features, layer_norm
        self.fused, self.last_path = fused, None
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))  # latent: only its sign is used
        self.g = nn.Parameter(torch.ones(in_features, **kw))
        self.h = nn.Parameter(torch.ones(out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.normal_(self.weight, std=0.01)

    @classmethod
    def from_linear(cls, linear: nn.Linear, init: str | None = "svd", latent_scale: float = 0.01,
                    layer_norm: bool = True, fused: bool | None = None) -> OneBitLinear:
        """Convert; ``init=None`` only builds the structure (a checkpoint will fill it)."""
        if init is not None and init not in INITS:
            raise ValueError(f"init must be one of {INITS} or None, got {init!r}")
        if not latent_scale > 0:
            raise ValueError(f"latent_scale must be > 0, got {latent_scale}")
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, layer_norm=layer_norm,
                  device=w.device, dtype=w.dtype, fused=fused)
        if init is not None:
            with torch.no_grad():
                h, g = svid(w, init)
                new.h.copy_(h)
                new.g.copy_(g)
                new.weight.copy_(sign_pm1(w) * latent_scale)
                if linear.bias is not None:
                    new.bias.copy_(linear.bias)
        return new

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"layer_norm={self.layer_norm}, fused={self.fused}")

    def _combine(self, x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * self.g.to(x.dtype), signs.to(x.dtype)) * self.h.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return _normalize(y, self.layer_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = PATH.use(self.fused, self.weight, x)
        self.last_path = "fused" if fused else "eager"
        if not fused:
            return self._combine(x, _SignSurrogate.apply(self.weight))
        w = effective_weight(self.weight, self.g, self.h)
        return _normalize(F.linear(x, w, self.bias), self.layer_norm)

    @property
    def average_bits(self) -> float:
        """Storage bits per weight with 16-bit ``g``, ``h``: ``1 + 16 (in + out) / (in · out)``."""
        return 1 + 16 * (self.in_features + self.out_features) / (self.in_features * self.out_features)

    @torch.no_grad()
    def export(self) -> OneBitPacked:
        return OneBitPacked(self)


class OneBitPacked(nn.Module):
    """Inference form: 8 signs per byte (``packed``) plus ``g``, ``h`` (and bias) as buffers; same outputs."""

    #: the technique whose surgery installs this layer (lightning_ext.surgery refuses a second one on it)
    surgery_technique = "OneBit"

    def __init__(self, layer: OneBitLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.layer_norm = layer.in_features, layer.out_features, layer.layer_norm
        self.fused = layer.fused  # the layer's path, so that the outputs are the same bits
        self.register_buffer("packed", pack_signs(layer.weight))
        for name in ("g", "h", "bias"):
            value = getattr(layer, name)
            self.register_buffer(name, None if value is None else value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        signs = unpack_signs(self.packed, (self.out_features, self.in_features), self.g.dtype)
        if PATH.use(self.fused, signs, x):  # ±1 is its own sign: the kernel's W_eff is the training layer's
            return _normalize(F.linear(x, effective_weight(signs, self.g, self.h), self.bias), self.layer_norm)
        return OneBitLinear._combine(self, x, signs.to(x.dtype))


def _row_normalized(t: torch.Tensor) -> torch.Tensor:
    t = t.float()
    return t / t.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      student_hidden: list[torch.Tensor] | None = None,
                      teacher_hidden: list[torch.Tensor] | None = None, kl_weight: float = 1.0,
                      mse_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """OneBit's KD loss (paper formula; see module docstring): ``{"loss", "kl", "mse"}``.

    ``kl``: KL(teacher ‖ student) over the last (vocabulary) dimension, mean over all other positions (tokens);
    ``mse``: sum over layers of the per-token mean ``‖q_T/‖q_T‖ − q_S/‖q_S‖‖²``.
    """
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    mse = kl.new_zeros(())
    for s, t in zip(student_hidden or [], teacher_hidden or []):
        mse = mse + (_row_normalized(s) - _row_normalized(t.detach())).pow(2).sum(-1).mean()
    return {"loss": kl_weight * kl + mse_weight * mse, "kl": kl.detach(), "mse": mse.detach()}


def output_logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "logits" in output:
        return output["logits"]
    if hasattr(output, "logits"):
        return output.logits
    raise TypeError(f"OneBit distillation: cannot find logits in the model output of type {type(output).__name__} "
                    "(return a tensor, a dict with 'logits', or an object with .logits)")


def export_packed(model: nn.Module) -> dict[str, OneBitPacked]:
    """Replace every :class:`OneBitLinear` of ``model`` by its packed form (8 signs per byte + g, h): same outputs,
    buffers only. Returns the new modules by name."""
    from lightning_ext.surgery import replace_modules

    names = [n for n, m in model.named_modules() if isinstance(m, OneBitLinear)]
    if not names:
        raise ValueError("OneBit.export: the model has no OneBitLinear layer")
    return replace_modules(model, names, lambda _, old: old.export())
